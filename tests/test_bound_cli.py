"""`litejax bound --json`: the schema, numbers, and exit status."""
import contextlib
import io
import json

import pytest

from litejax import cli
from litejax.analysis import bound as cost

KEYS = ('flops_per_token_analytic', 'flops_per_token_compiled', 'ratio', 'by_component', 'params_total',
        'params_active_per_token', 'params_expert_active_per_token', 'collective_bytes_per_rank',
        'collective_bytes_per_rank_analytic', 'dispatch', 'compile_seconds')
SMALL = ['--set', 'model.d_model=32', '--set', 'model.num_layers=2', '--set', 'model.seq_len=32',
         '--set', 'model.num_heads=2', '--set', 'model.num_kv_heads=2', '--set', 'moe.d_expert=32']


@pytest.fixture(scope='module', autouse=True)
def compile_once():
  """The CLI's flags (--json, --tol) change the report, not the program: compile each config once."""
  orig, memo = cost.compile_program, {}

  def cached(cfg, **kw):
    key = (cfg, tuple(sorted(kw.items())))
    if key not in memo:
      memo[key] = orig(cfg, **kw)
    return memo[key]
  cost.compile_program = cached
  yield
  cost.compile_program = orig


def run(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(['bound', '--config', 'configs/tiny.yaml', *SMALL, '--devices', '1', *argv])
  return rc, out.getvalue(), err.getvalue()


def test_json_schema_is_present_and_numeric():
  rc, text, _ = run('--json')
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
  rc, _, err = run('--tol', '-0.5')     # a negative tolerance: every config exceeds it
  assert rc == 1
  assert 'BOUND EXCEEDED' in err and 'experts' in err, err


def test_table_prints_formula():
  rc, text, _ = run()
  assert rc == 0 and 'spec:' in text and 'experts' in text and 'BOUND OK' in text


def test_train_json_reports_the_update_and_all_reduce():
  rc, text, err = run('--train', '--json')
  rep = json.loads(text)
  assert rc == 0, err
  opt = rep['optimizer']
  assert opt['bytes_accessed_per_step'] > 0 and opt['flops_per_token'] > 0
  assert opt['ratio'] <= rep['optimizer_factor']
  assert 'all_reduce_bytes_per_rank' in rep and rep['memory_bytes_per_device']['temp'] > 0
