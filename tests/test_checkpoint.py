"""Checkpoints: restore onto 8, 4 and 1 devices; incompatible configs; truncated and half-written
checkpoints; a non-finite loss never replaces the last good checkpoint."""
import shutil

import jax
import numpy as np
import pytest

from litejax import sharding as shd
from litejax.train import loop as train_lib
from litejax.train import step as train_step
from litejax.train.checkpoint import Checkpointer
from litejax.train.leaf_specs import CheckpointMismatchError
from litejax.config import load_config
from train_helpers import TINY, TINY_YAML, enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

# The same programs as tests/test_train.py (30-step schedule), stopped after 6 steps.
RUN = TINY + ['train.steps=30', 'train.eval_every=10', 'train.ckpt_every=3']
enable_compile_cache()


def tiny_cfg(*extra):
  return load_config(TINY_YAML, RUN + list(extra))


def sub_mesh(cfg, n):
  """A mesh over the first n of this process's 8 devices (restore targets a different mesh)."""
  return shd.make_mesh(cfg.mesh, jax.devices()[:n])


def restore(cfg, ckpt_dir, mesh=None, step=None):
  mesh = mesh or shd.make_mesh(cfg.mesh)
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  ckpt = Checkpointer(ckpt_dir)
  try:
    return ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def run8(tmp_path_factory):
  """6 steps on 8 devices with checkpoints at 3 and 6 (tests copy it before changing anything)."""
  d = tmp_path_factory.mktemp('run8')
  result = train_lib.train(tiny_cfg(), ckpt_dir=d / 'ckpt', stop_after=6, quiet=True)
  assert result.status == 'stopped' and result.step == 6
  return d / 'ckpt'


@pytest.mark.parametrize('n', [4, 1])
def test_restore_8_devices_onto_fewer(run8, tmp_path, n):
  cfg = tiny_cfg()
  saved = restore(cfg, run8, step=3)
  mesh = sub_mesh(cfg, n)
  restored = restore(cfg, run8, mesh=mesh, step=3)
  assert restored.step == 3 and int(restored.state['step']) == 3
  want, got = flat(saved.state), flat(restored.state)
  assert sorted(got) == sorted(want)
  for k in want:
    assert np.array_equal(got[k], want[k]), k
  leaf = restored.state['params']['embed'][...]
  assert leaf.sharding.mesh.devices.size == n
  if n != 1:
    return    # continuing is checked on 1 device only: each mesh size is a fresh compile
  # Training continues on the smaller mesh from step 3.
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(run8, ckpt)
  shutil.rmtree(ckpt / '6')
  result = train_lib.train(cfg, ckpt_dir=ckpt, resume=True, stop_after=5, mesh=mesh, quiet=True)
  assert result.status == 'stopped' and result.step == 5
  assert [r['step'] for r in result.history] == [4, 5]
  assert all(np.isfinite(r['loss']) for r in result.history)


def test_different_d_model_is_a_clear_error(run8):
  with pytest.raises(CheckpointMismatchError,
                     match=r'params/\S+ has shape \(32, 2, 16\) in the checkpoint but \(64, 2, 32\)'):
    restore(tiny_cfg('model.d_model=64'), run8)
  with pytest.raises(CheckpointMismatchError, match='in the checkpoint but'):
    train_lib.train(tiny_cfg('model.d_model=64'), ckpt_dir=run8, resume=True, quiet=True)


def test_truncated_and_half_written_checkpoints_are_skipped(run8, tmp_path):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(run8, ckpt)
  # A save cut off by a kill: Orbax's temporary folder, never committed, must not even be listed.
  shutil.copytree(ckpt / '6', ckpt / '9.orbax-checkpoint-tmp-1234')
  # Step 6's tensor data truncated to half (disk full, copy cut short).
  data = [f for f in (ckpt / '6' / 'state').rglob('*') if f.is_file() and f.stat().st_size > 64
          and 'd' in f.parent.name]
  assert data, list((ckpt / '6' / 'state').rglob('*'))
  for f in data:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  with pytest.warns(RuntimeWarning, match=r'/6 is unreadable'):
    restored = restore(tiny_cfg(), ckpt)
  assert restored.step == 3
  want = flat(restore(tiny_cfg(), run8, step=3).state)
  for k, v in flat(restored.state).items():
    assert np.array_equal(v, want[k]), k


def test_nan_stops_and_keeps_last_good_checkpoint(run8, tmp_path):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(run8, ckpt)
  before = flat(restore(tiny_cfg(), ckpt).state)
  # Resume at step 6 with an absurd learning rate (1 device: a cheaper compile than 8).
  bad = tiny_cfg('train.lr=1.0e+30', 'train.warmup_steps=0')
  with pytest.raises(train_lib.NonFiniteLossError, match=r'non-finite loss at step (7|8|9|1\d)\b') as e:
    train_lib.train(bad, ckpt_dir=ckpt, resume=True, mesh=sub_mesh(bad, 1), quiet=True)
  assert e.value.last_checkpoint == 6
  ck = Checkpointer(ckpt)
  assert ck.all_steps() == [3, 6]
  ck.close()
  after = restore(tiny_cfg(), ckpt)
  assert after.step == 6
  for k, v in before.items():
    assert np.array_equal(flat(after.state)[k], v), k
