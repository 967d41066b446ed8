"""`litejax generate` end to end on a tiny checkpoint trained in-process for 2 steps."""
import json

import jax
import pytest

from litejax import cli
from litejax.train import loop as train_lib, step as train_step
from litejax.config import load_config
from litejax.sharding import make_mesh
from train_helpers import TINY, TINY_YAML, enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()

RUN = TINY + ['model.scan_layers=true', 'train.steps=2', 'train.ckpt_every=2', 'train.eval_every=2',
              'mesh.data=1']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp('gen')
  cfg = load_config(TINY_YAML, RUN)
  train_lib.train(cfg, ckpt_dir=d / 'ckpt', metrics_path=d / 'm.jsonl', quiet=True,
                  mesh=make_mesh(cfg.mesh, jax.devices()[:1]))
  return d / 'ckpt'


def test_generate_json(ckpt, tmp_path, capsys):
  prompts = tmp_path / 'p.txt'
  prompts.write_text('In the beginning\nAnd God said\n\xff\n', encoding='utf-8')
  rc = cli.main(['generate', '--ckpt-dir', str(ckpt), '--prompts', str(prompts), '--max-new-tokens', '6',
                 '--temperature', '0.8', '--top-k', '20', '--seed', '1', '--json'])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  for key in ('texts', 'tokens', 'ttft_ms', 'ms_per_token_p50', 'ms_per_token_p99', 'tokens_per_second',
              'compiles', 'latency_split'):
    assert key in out, key
  assert len(out['texts']) == 3 and all(len(t) == 6 for t in out['tokens'])
  assert out['compiles'] == 1 and out['ms_per_token_p50'] > 0 and out['tokens_per_second'] > 0
  split = out['latency_split']
  assert split['dominant'] in ('compute', 'communication', 'memory', 'overhead', 'host') and split['flops'] > 0
  assert split['kernels'] > 0 and split['overhead_s'] > 0   # the per-kernel term of this host
  assert split['host_calls'] == 4 and split['host_s'] > 0   # the loop's calls into the runtime
  # the model's prediction beside the measurement of the same step
  assert split['predicted_ms_per_token'] > 0 and split['measured_ms_per_token'] == out['ms_per_token_p50']
  assert split['predicted_over_measured'] == pytest.approx(split['predicted_ms_per_token'] / out['ms_per_token_p50'])
  assert out['checkpoint_step'] == 2 and out['checkpoints_skipped'] == []
  # Arbitrary bytes decode with replacement characters, never an exception.
  assert all(isinstance(t, str) for t in out['texts'])


def test_generate_text_is_greedy_and_deterministic(ckpt, capsys):
  args = ['generate', '--ckpt-dir', str(ckpt), '--prompt', 'In the', '--max-new-tokens', '4']
  assert cli.main(args) == 0
  first = capsys.readouterr().out
  assert cli.main(args) == 0
  assert capsys.readouterr().out == first and first.startswith('In the')


@pytest.mark.parametrize('how', ['flip', 'truncate', 'missing'])
def test_damaged_newest_checkpoint_is_skipped_and_left_in_place(ckpt, tmp_path, capsys, how):
  """generate reads the newest intact step, says which one it skipped, and renames nothing (a reader may
  not: the folder may belong to a running train)."""
  import shutil

  from fault_helpers import damage
  args = ['--prompt', 'In the', '--max-new-tokens', '4']
  assert cli.main(['generate', '--ckpt-dir', str(ckpt), *args]) == 0
  want = capsys.readouterr().out
  shutil.copytree(ckpt, tmp_path / 'ck')
  shutil.copytree(ckpt / '2', tmp_path / 'ck' / '4')     # a newer step (a copy: its digest matches) ...
  f = max((p for p in (tmp_path / 'ck' / '4').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  damage(f, how)                                          # ... then damaged
  assert cli.main(['generate', '--ckpt-dir', str(tmp_path / 'ck'), *args]) == 0
  out, err = capsys.readouterr()
  assert out == want
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'litejax generate: warning: checkpoint {tmp_path}/ck/4 is '
                                                 f'unreadable (CheckpointCorruptError: {f}: '), err
  assert lines[0].endswith('skipping it and trying an older one'), err
  assert sorted(p.name for p in (tmp_path / 'ck').iterdir()) == ['2', '4']


def test_no_checkpoint_says_train_first(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(['generate', '--prompt', 'x']) == 2
  assert 'litejax train' in capsys.readouterr().err
  assert cli.main(['generate', '--ckpt-dir', str(tmp_path), '--prompt', 'x']) == 2
  assert 'litejax train' in capsys.readouterr().err


def test_bad_flags_are_named(ckpt, capsys):
  assert cli.main(['generate', '--ckpt-dir', str(ckpt), '--prompt', 'x', '--top-p', '0']) == 2
  assert '--top-p' in capsys.readouterr().err
  assert cli.main(['generate', '--ckpt-dir', str(ckpt)]) == 2
  assert '--prompt' in capsys.readouterr().err


def _full_restore(ckpt_dir, cfg, mesh):
  from litejax.train.checkpoint import Checkpointer
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  c = Checkpointer(ckpt_dir)
  try:
    return c.restore(abstract).state
  finally:
    c.close()


@pytest.mark.parametrize('update', ['module checkpoint', 'sparse'])
def test_generate_restores_only_params(ckpt, tmp_path, update):
  # generation.load reads params and extra alone (Orbax partial restore): equal to the whole train
  # state's restore leaf for leaf, and the greedy tokens are those of the fully restored model; the
  # sparse expert update's optimizer state (row tables) does not get in the way.
  import numpy as np

  from litejax.inference import decode, session as generation
  cfg = load_config(TINY_YAML, RUN + ([] if update == 'module checkpoint' else [f'train.expert_update={update}']))
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  if update != 'module checkpoint':
    ckpt = tmp_path / 'ckpt'
    train_lib.train(cfg, ckpt_dir=ckpt, metrics_path=tmp_path / 'm.jsonl', quiet=True, mesh=mesh)
  full = _full_restore(ckpt, cfg, mesh)
  session = generation.load(ckpt, devices=jax.devices()[:1])
  assert session.step == 2
  for part in ('params', 'extra'):
    got, want = jax.tree.leaves(getattr(session, part)), jax.tree.leaves(full[part])
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)), part
  gen = session.generate([[5, 6, 7]], 4)
  rt = decode.make_runtime(session.cfg, session.mesh, 1, 7)
  with jax.set_mesh(session.mesh):
    ref = decode.generate(rt, full['params'], full['extra'], [[5, 6, 7]], 4)
  assert gen.tokens == ref.tokens
