"""`litejax bound --json`: the schema, numbers, and exit status."""
import contextlib
import io
import json

from litejax import cli

KEYS = ('flops_per_token_analytic', 'flops_per_token_compiled', 'ratio', 'by_component', 'params_total',
        'params_active_per_token', 'params_expert_active_per_token', 'collective_bytes_per_rank',
        'collective_bytes_per_rank_analytic', 'dispatch', 'compile_seconds')
SMALL = ['--set', 'model.d_model=32', '--set', 'model.num_layers=2', '--set', 'model.seq_len=32',
         '--set', 'model.num_heads=2', '--set', 'model.num_kv_heads=2', '--set', 'moe.d_expert=32']


def run(*argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.main(['bound', '--config', 'configs/tiny.yaml', *SMALL, '--devices', '1', *argv])
  return rc, out.getvalue()


def test_json_schema_is_present_and_numeric():
  rc, text = run('--json')
  rep = json.loads(text)
  assert rc == 0
  for k in KEYS:
    assert k in rep, k
  for k in KEYS:
    if k not in ('by_component', 'dispatch'):
      assert isinstance(rep[k], (int, float)), k
  assert isinstance(rep['dispatch'], str)
  for row in rep['by_component'].values():
    assert isinstance(row['analytic'], (int, float)) and isinstance(row['compiled'], (int, float))


def test_exit_1_names_the_component():
  rc, _ = run('--set', 'moe.dispatch=einsum', '--set', 'model.seq_len=512', '--tol', '-0.5')
  assert rc == 1


def test_table_prints_formula():
  rc, text = run()
  assert rc == 0 and 'spec:' in text and 'experts' in text and 'BOUND OK' in text
