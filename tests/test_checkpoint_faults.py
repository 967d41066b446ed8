"""Checkpoints under injected faults (issue 14): SIGKILL during asynchronous saves (20 seeds), a full
disk in the write path, flipped and truncated bytes. Small NumPy states keep these cheap; the training
loop's own resume (bit-exact losses, metrics 1..N once each after a kill) is tests/test_train.py's."""
import errno
import pathlib
import shutil
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint._src.handlers.json_checkpoint_handler as json_handler
import pytest

from litejax.train.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointWriteError
from litejax.train.digest import DIGEST_FILE
from litejax.train.leaf_specs import CheckpointMismatchError
from train_helpers import subprocess_env

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_kill_worker import state  # noqa: E402
from fault_helpers import DAMAGES, damage  # noqa: E402

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

SEEDS = 20
ABSTRACT = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), state(0))


def restore(directory, step=None):
  ck = Checkpointer(directory)
  try:
    return ck.restore(ABSTRACT, step=step)
  finally:
    ck.close()


def assert_state(restored, step):
  want = state(step)
  for k in ('w', 'b'):
    assert np.array_equal(np.asarray(restored.state['params'][k]), want['params'][k]), (step, k)
  assert int(restored.state['step']) == step and restored.meta['data']['next_batch'] == step


@pytest.fixture(scope='module')
def killed_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp('killed')
  p = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / 'ckpt_kill_worker.py'), str(out / 'runs'),
                      str(SEEDS)], env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return sorted((out / 'runs').iterdir(), key=lambda d: int(d.name))


def test_sigkill_during_async_saves_restores_newest_complete(killed_runs):
  # Every kill came after the run's first logged step (ckpt_kill_worker waits for it): all 20 are checked.
  assert len(killed_runs) == SEEDS
  for run in killed_runs:
    committed = [int(s) for s in (run / 'committed').read_text().split()]
    assert committed, run
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')       # a step killed between its commit and its digest is unverified
      restored = restore(run / 'ckpt')
    assert restored is not None, run
    # Newest complete: at least the newest step the child knew was on disk, at most the one after it
    # (committed by Orbax, killed before the child could log it); and exactly that step's arrays.
    assert committed[-1] <= restored.step <= committed[-1] + 1, (run, committed[-1], restored.step)
    assert_state(restored, restored.step)


def _save(directory, steps, keep=3):
  ck = Checkpointer(directory, keep=keep)
  for s in steps:
    ck.save(s, state(s), {'data': {'next_batch': s}})
  ck.close()


def test_disk_full_during_save_is_a_clear_error_and_previous_restores(tmp_path, monkeypatch):
  _save(tmp_path / 'ckpt', [1, 2])

  async def full_disk(self, item, directory):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', full_disk)
  ck = Checkpointer(tmp_path / 'ckpt')
  with pytest.raises(CheckpointWriteError, match=r'writing checkpoint step 3 to \S+ failed: no space left on '
                     r'device; the previous checkpoint \(step 2\) is kept') as e:
    ck.save(3, state(3), {'data': {'next_batch': 3}})
    ck.wait()
  assert e.value.errno == errno.ENOSPC
  ck.close()
  monkeypatch.undo()
  assert_state(restore(tmp_path / 'ckpt'), 2)


def _tensor_files(step_dir: pathlib.Path):
  return [f for f in (step_dir / 'state').rglob('*') if f.is_file() and '/d/' in str(f) and f.stat().st_size > 64]


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, damage):
  _save(tmp_path / 'ckpt', [1, 2])
  f = _tensor_files(tmp_path / 'ckpt' / '2')[0]
  data = bytearray(f.read_bytes())
  if damage == 'flip':
    data[len(data) // 2] ^= 0x10
  else:
    del data[len(data) // 2:]
  f.write_bytes(bytes(data))
  with pytest.warns(RuntimeWarning, match=rf'/2 is unreadable \(CheckpointCorruptError: {f}'):
    restored = restore(tmp_path / 'ckpt')
  assert_state(restored, 1)


def test_no_intact_checkpoint_stops_naming_the_file(tmp_path):
  _save(tmp_path / 'ckpt', [1])
  f = _tensor_files(tmp_path / 'ckpt' / '1')[0]
  data = bytearray(f.read_bytes())
  data[-1] ^= 0xFF
  f.write_bytes(bytes(data))
  with pytest.warns(RuntimeWarning), pytest.raises(CheckpointCorruptError, match=rf'no intact checkpoint .*{f}'):
    restore(tmp_path / 'ckpt')
  assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['1']   # nothing moved: the user decides


WHY = {'flip': 'sha256-differs', 'truncate': 'truncated', 'missing': 'file-missing'}


@pytest.mark.parametrize('how', DAMAGES)
def test_writer_moves_a_damaged_step_aside_readers_only_skip_it(tmp_path, how):
  """A reader (read_only) skips the damaged newest step and changes nothing; the writer moves it aside to a
  name that says why (never deleting it) and can then save that step afresh."""
  ck = tmp_path / 'ckpt'
  _save(ck, [1, 2])
  f = _tensor_files(ck / '2')[0]
  damage(f, how)
  reader = Checkpointer(ck, read_only=True)
  with pytest.warns(RuntimeWarning, match=rf'/2 is unreadable \(CheckpointCorruptError: {f}'):
    restored = reader.restore(ABSTRACT)
  reader.close()
  assert restored.step == 1 and [s for s, _ in restored.skipped] == [2] and str(f) in restored.skipped[0][1]
  assert sorted(p.name for p in ck.iterdir()) == ['1', '2']
  writer = Checkpointer(ck)
  with pytest.warns(RuntimeWarning, match=rf'moved the damaged checkpoint {ck}/2 aside to {ck}/2.corrupt-{WHY[how]}'):
    assert_state(writer.restore(ABSTRACT), 1)
  aside = ck / f'2.corrupt-{WHY[how]}'
  assert sorted(p.name for p in ck.iterdir()) == ['1', aside.name] and writer.all_steps() == [1]
  assert str(f) in (aside / 'litejax_moved_aside.txt').read_text()
  writer.save(2, state(2), {'data': {'next_batch': 2}})      # the skipped step, saved afresh
  writer.close()
  assert_state(restore(ck), 2)


def test_digest_lists_every_file(tmp_path):
  _save(tmp_path / 'ckpt', [1])
  import json
  digest = json.loads((tmp_path / 'ckpt' / '1' / DIGEST_FILE).read_text())['files']
  on_disk = {str(p.relative_to(tmp_path / 'ckpt' / '1')) for p in (tmp_path / 'ckpt' / '1').rglob('*')
             if p.is_file() and p.name != DIGEST_FILE}
  assert set(digest) == on_disk and any(k.startswith('state/') for k in digest)


def test_partial_and_single_leaf_reads_share_the_checks(tmp_path):
  """The reader's partial restore (params alone, as decoding reads them) and single-leaf reads (as
  export-experts reads them) go through the same digest check, fall-back and shape check as a full restore."""
  _save(tmp_path / 'ckpt', [1, 2])
  f = _tensor_files(tmp_path / 'ckpt' / '2')[0]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))
  in_flight = tmp_path / 'ckpt' / '3.orbax-checkpoint-tmp-1234'    # another process's save, still writing
  shutil.copytree(tmp_path / 'ckpt' / '1', in_flight)
  ck = Checkpointer(tmp_path / 'ckpt', read_only=True)
  try:
    assert ck.all_steps() == [1, 2]
    with pytest.warns(RuntimeWarning, match=rf'/2 is unreadable \(CheckpointCorruptError: {f}'):
      restored = ck.restore({'params': ABSTRACT['params']}, partial=True)
    assert restored.step == 1 and set(restored.state) == {'params'}
    for k in ('w', 'b'):
      assert np.array_equal(np.asarray(restored.state['params'][k]), state(1)['params'][k]), k
    with pytest.raises(CheckpointCorruptError, match=str(f)):
      ck.read_leaf(2, 'params/w')
    wrong = {'params': {'w': jax.ShapeDtypeStruct((64, 33), np.float32)}}
    with pytest.raises(CheckpointMismatchError, match=r'params/w has shape \(64, 32\) in the checkpoint but \(64, 33\)'):
      ck.restore(wrong, step=1, partial=True)
  finally:
    ck.close()
  assert in_flight.is_dir()              # a reader never deletes a writer's temporary folder


def test_reader_takes_the_newest_complete_step_while_a_save_is_held_open(tmp_path, monkeypatch):
  """A writer holding the run lock (as `litejax train` does) saves step 3 while a reader restores: while the
  save is held open mid-write, and while it is committed but not yet digested, the reader takes step 2 and
  leaves the writer's files alone; once the writer's `poll` has digested it, the reader takes step 3."""
  import asyncio
  import threading

  from litejax.train import run_folder
  ck = tmp_path / 'ckpt'
  _save(ck, [1, 2])
  entered, release = threading.Event(), threading.Event()
  original = json_handler.JsonCheckpointHandler._save_fn

  async def held_open(self, item, directory):
    entered.set()
    await asyncio.to_thread(release.wait, 60)
    return await original(self, item, directory)

  monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', held_open)
  with run_folder.RunLock(run_folder.make_paths(str(ck), None)):
    writer = Checkpointer(ck)
    saving = threading.Thread(target=writer.save, args=(3, state(3), {'data': {'next_batch': 3}}))
    saving.start()
    try:
      assert entered.wait(60)
      in_flight = list(ck.glob('3.orbax-checkpoint-tmp*'))
      assert in_flight and not (ck / '3').exists()          # mid-write: Orbax's temporary folder only
      reader = Checkpointer(ck, read_only=True)
      assert reader.all_steps() == [1, 2]
      assert_state(reader.restore(ABSTRACT), 2)
      assert all(p.is_dir() for p in in_flight)
    finally:
      release.set()
      saving.join()
    while writer.manager.is_saving_in_progress():
      time.sleep(0.01)
    assert (ck / '3').is_dir() and not (ck / '3' / DIGEST_FILE).exists()   # committed, not yet digested
    with pytest.warns(RuntimeWarning, match=rf'checkpoint {ck}/3: its save is not finished'):
      restored = reader.restore(ABSTRACT)
    assert_state(restored, 2)
    assert restored.skipped[0][0] == 3
    writer.poll()                                   # what the training loop does after every step
    assert (ck / '3' / DIGEST_FILE).is_file()
    with warnings.catch_warnings():
      warnings.simplefilter('error')                # verified: no warning
      assert_state(reader.restore(ABSTRACT), 3)
    reader.close()
    writer.close()
