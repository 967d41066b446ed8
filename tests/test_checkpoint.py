"""Checkpoints: restore onto 8, 4 and 1 devices; incompatible configs; truncated and half-written
checkpoints; a non-finite loss never replaces the last good checkpoint."""
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from litejax import sharding as shd
from litejax import train as train_lib
from litejax.checkpoint import Checkpointer, CheckpointMismatchError
from litejax.config import load_config
from train_helpers import REPO, TINY, enable_compile_cache, subprocess_env

TINY = TINY + ['train.eval_every=100', 'train.steps=6', 'train.ckpt_every=3']
enable_compile_cache()


def tiny_cfg(*extra):
  return load_config(REPO / 'configs' / 'tiny.yaml', TINY + list(extra))


def restore_params(cfg, ckpt_dir, mesh=None, step=None):
  mesh = mesh or shd.make_mesh(cfg.mesh)
  _, abstract, _ = train_lib.state_layout(cfg, mesh, train_lib.make_optimizer(cfg.train))
  ckpt = Checkpointer(ckpt_dir)
  try:
    restored = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  return restored


def flat_params(state):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state['params'])}


@pytest.fixture(scope='module')
def run8(tmp_path_factory):
  """6 steps on 8 devices with checkpoints at 3 and 6 (read-only for tests: copy before changing)."""
  d = tmp_path_factory.mktemp('run8')
  result = train_lib.train(tiny_cfg(), ckpt_dir=d / 'ckpt', quiet=True)
  assert result.status == 'done'
  return d / 'ckpt'


RESTORE_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import jax
    sys.path.insert(0, sys.argv[1])
    from test_checkpoint import flat_params, restore_params, tiny_cfg
    from litejax import train as train_lib
    cfg = tiny_cfg()
    assert len(jax.devices()) == int(sys.argv[4]), jax.devices()
    restored = restore_params(cfg, sys.argv[2], step=3)
    want = np.load(sys.argv[3])
    got = flat_params(restored.state)
    assert sorted(got) == sorted(want.files)
    for k in got:
      assert np.array_equal(got[k], want[k]), k
    # Training continues from step 3 on this mesh.
    result = train_lib.train(cfg, ckpt_dir=sys.argv[2], resume=True, quiet=True)
    assert result.status == 'done' and result.step == 6, result
    print('OK', len(jax.devices()))
''')


def test_restore_8_to_4_and_1_devices(run8, tmp_path):
  restored = restore_params(tiny_cfg(), run8, step=3)
  assert restored.step == 3 and int(restored.state['step']) == 3
  np.savez(tmp_path / 'params8.npz', **flat_params(restored.state))
  procs = []
  for n in (4, 1):
    ckpt = tmp_path / f'ckpt{n}'
    shutil.copytree(run8, ckpt)
    shutil.rmtree(ckpt / '6')         # continue from step 3
    env = subprocess_env(n)
    procs.append(subprocess.Popen(
        [sys.executable, '-c', RESTORE_SCRIPT, str(REPO / 'tests'), str(ckpt), str(tmp_path / 'params8.npz'),
         str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for n, p in zip((4, 1), procs):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and f'OK {n}' in out, err[-3000:]


def test_different_d_model_is_a_clear_error(run8):
  with pytest.raises(CheckpointMismatchError, match=r'params/\S+ has shape \(32, 2, 16\) in the checkpoint but \(64, 2, 32\)'):
    restore_params(tiny_cfg('model.d_model=64'), run8)
  with pytest.raises(CheckpointMismatchError, match='shape'):
    train_lib.train(tiny_cfg('model.d_model=64'), ckpt_dir=run8, resume=True, quiet=True)


def test_truncated_and_half_written_checkpoints_are_skipped(run8, tmp_path):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(run8, ckpt)
  # A save cut off by a kill: Orbax's temporary folder, never committed.
  shutil.copytree(ckpt / '6', ckpt / '9.orbax-checkpoint-tmp-1234')
  # Step 6's tensor data truncated to half (disk full, copy cut short).
  data = [f for f in (ckpt / '6' / 'state').rglob('*') if f.is_file() and f.stat().st_size > 64
          and 'd' in f.parent.name]
  assert data, list((ckpt / '6' / 'state').rglob('*'))
  for f in data:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  with pytest.warns(RuntimeWarning, match=r'/6 is unreadable'):
    restored = restore_params(tiny_cfg(), ckpt)
  assert restored.step == 3
  want = restore_params(tiny_cfg(), run8, step=3)
  for k, v in flat_params(want.state).items():
    assert np.array_equal(flat_params(restored.state)[k], v), k


def test_nan_stops_and_keeps_last_good_checkpoint(run8, tmp_path, capsys):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(run8, ckpt)
  before = flat_params(restore_params(tiny_cfg(), ckpt).state)
  # Resume the finished 6-step run into a 12-step schedule with an absurd learning rate.
  bad = tiny_cfg('train.steps=12', 'train.lr=1.0e+30', 'train.warmup_steps=0')
  with pytest.raises(train_lib.NonFiniteLossError, match=r'non-finite loss at step (7|8|9|10|11|12)\b') as e:
    train_lib.train(bad, ckpt_dir=ckpt, resume=True, quiet=True)
  assert e.value.last_checkpoint == 6
  ck = Checkpointer(ckpt)
  assert ck.all_steps() == [3, 6]
  ck.close()
  after = restore_params(tiny_cfg(), ckpt)
  assert after.step == 6
  for k, v in before.items():
    assert np.array_equal(flat_params(after.state)[k], v), k
