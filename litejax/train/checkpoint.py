"""Checkpoints with Orbax `CheckpointManager`: train state + a JSON sidecar, restored onto any mesh.

A checkpoint `DIR/<step>/` holds two items:
  state  the train-state pytree (params, optimizer state, step, RNG key data), saved by
         `StandardSave` (OCDBT/zarr tensors; no pickle anywhere).
  meta   JSON: step, the next data position, the full config, and every state leaf's shape and dtype.

Restore goes through an *abstract* state whose leaves are `jax.ShapeDtypeStruct`s carrying the
current mesh's shardings, so a checkpoint written on 8 devices is read straight onto 4 or 1. Before
any tensor is read, the saved shapes in `meta` are compared with the abstract state: an incompatible
config fails with `CheckpointMismatchError` naming the first mismatched leaf.

`Checkpointer` is the one reader: the whole state (`restore`), some of it (`restore(partial=True)`: params
and extra for decoding, never the optimizer state), one array as NumPy (`read_leaf`, for exporting
experts), the sidecar (`newest_meta`) and the config stored with it (`restore_config`). Each goes through
the same digest check (`verify`, once per step and reader), shape check (`check_compatible`) and
newest-intact fall-back (`Checkpointer._newest_intact`).

Faults:
  * a save cut off by a kill: Orbax writes each step to a temporary folder and renames it only when
    complete, so it is never even listed (and the writer deletes its leftovers);
  * a changed file (flipped bit, truncation, a file gone): once a save is committed, process 0 records
    every file's size and SHA-256 (litejax.train.digest; `poll` does it as soon as the save finishes);
    restore checks them before reading a tensor and skips a checkpoint that differs, with a warning naming
    the file, for the previous one. The writer (the run lock's holder, litejax.train.run_folder) then
    moves each skipped step aside, `DIR/<step>.corrupt-<why>`, so that the run saves that step afresh;
    a reader (read_only) changes nothing. If no checkpoint is intact, restore raises
    `CheckpointCorruptError` and moves nothing (never a silent fresh start);
  * a save in flight: a reader skips the newest step while it has no digest and a live writer holds the
    run lock (its save is not finished), and reads the previous one;
  * a failed write (disk full): `CheckpointWriteError` names the step and the intact previous one.
A checkpoint committed by Orbax but cut off before its digest was written (no live writer) is restored
unverified, with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import pathlib
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from litejax.config import Config, from_dict
from litejax.train import digest, run_folder
from litejax.train.leaf_specs import CheckpointMismatchError, check_compatible, leaf_specs


FORMAT_VERSION = 1


class CheckpointCorruptError(RuntimeError):
  """A checkpoint differs from its digest (`kind` says how: litejax.train.digest.Damage), or none could be
  read intact (each was skipped with a warning)."""

  def __init__(self, message: str, kind: str = 'unreadable'):
    super().__init__(message)
    self.kind = kind


class CheckpointInFlightError(RuntimeError):
  """A reader asked for a step whose save a live writer has not finished (no digest yet)."""


class CheckpointWriteError(OSError):
  """A save failed (e.g. the disk is full); the previous checkpoint, if any, is untouched."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns."""
  step: int
  state: Any
  meta: dict[str, Any]
  skipped: tuple[tuple[int, str], ...] = ()   # (newer step, why) passed over for this one


def holds_optimizer_state(meta: dict[str, Any]) -> bool:
  """Whether a checkpoint's sidecar lists optimizer state: a training checkpoint does; the weights a model
  was imported with (params, extra, step 0 and the key; litejax.hf) do not, and resuming them starts a
  fresh optimizer (litejax.train.loop)."""
  return any(name.startswith('opt/') for name in meta.get('leaves', {}))


def restore_config(directory: str | pathlib.Path) -> Config | None:
  """The config stored with the newest checkpoint of `directory` whose sidecar is intact (None: no
  checkpoint). Opens the folder read-only: nothing is created or cleaned up."""
  ckpt = Checkpointer(directory, read_only=True)
  try:
    found = ckpt.newest_meta()
    return None if found is None else from_dict(found[1]['config'])
  finally:
    ckpt.close()


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run in `directory`; saves asynchronously; reads them back.

  Every process calls every method (Orbax writes collectively: each process its own shards,
  process 0 the metadata and the digest). read_only: a reader (decoding, exporting, a preflight check)
  that creates nothing and leaves a running writer's temporary folders alone.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    d = str(directory)
    # Remote stores (gs://, s3://) go to Orbax as URLs; local paths are made absolute.
    self.directory = d if '://' in d else pathlib.Path(d).expanduser().absolute()
    self._local = '://' not in d
    self._read_only = read_only
    self._pending: int | None = None      # a step whose save may still be in flight
    self._digested: int | None = None     # `poll` wrote the pending step's digest already
    self._last_good: int | None = None
    self._verified: set[tuple[int, str]] = set()   # (step, file prefix) whose digest passed
    self.skipped: dict[int, str] = {}     # steps passed over by the fall-back, and why (for the user)
    self._damaged: dict[int, tuple[Exception, str]] = {}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only, enable_async_checkpointing=async_save,
        # Leftover temporary folders from a save cut off by a kill are deleted, never read (by the writer:
        # a reader must not delete the folder a running save is writing).
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def all_steps(self) -> list[int]:
    """Complete checkpoints, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving `state` at `step` (returns once device buffers are copied; writes continue in the
    background). `meta` must be JSON-serialisable; shapes and the format version are added.

    Raises CheckpointWriteError when this or the previous in-flight save failed to write.
    """
    if self._read_only:
      raise ValueError(f'{self.directory}: opened read-only')
    self._finish_pending()
    self._last_good = self.latest_step()
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION, leaves=leaf_specs(state))
    with _write_errors(self, step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self._pending = int(step)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON sidecar of one checkpoint as stored (no digest check, no tensors read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def newest_meta(self, step: int | None = None, *, whole: bool = False) -> tuple[int, dict[str, Any]] | None:
    """(step, sidecar) of the newest checkpoint whose sidecar passes its digest (whole: every file of it),
    or of exactly `step`. None when there is no checkpoint; the fall-back of `restore`."""
    return self._newest_intact(step, lambda s: (s, self._checked_meta(s, whole)))

  def restore(self, abstract_state: Any, step: int | None = None, *, partial: bool = False) -> Restored | None:
    """Restores the newest intact checkpoint (or exactly `step`) into `abstract_state`'s shardings.

    partial: `abstract_state` is a part of the saved state (e.g. {'params': ..., 'extra': ...}); an Orbax
    partial restore reads those arrays alone (the optimizer state is never read) and only their shapes
    are checked. Returns None when the directory holds no checkpoint. Raises CheckpointMismatchError
    when the checkpoint was written by an incompatible config. A checkpoint that cannot be read or
    fails its digest is skipped with a warning (only when `step` is None); CheckpointCorruptError when
    none is left.
    """
    current = leaf_specs(abstract_state)

    def read(s: int) -> Restored:
      meta = self._checked_meta(s, whole=True)
      check_compatible(meta.get('leaves', {}), current, f'checkpoint {self.directory}/{s}', partial=partial)
      if partial:
        args = ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
      else:
        args = ocp.args.StandardRestore(abstract_state)
      return Restored(step=s, state=self.manager.restore(s, args=ocp.args.Composite(state=args))['state'],
                      meta=meta)

    restored = self._newest_intact(step, read)
    if restored is not None:
      restored = dataclasses.replace(restored, skipped=tuple(
          (s, why) for s, why in sorted(self.skipped.items(), reverse=True) if s > restored.step))
    return restored

  def read_leaf(self, step: int, name: str) -> np.ndarray:
    """One saved parameter (an nnx Variable) of checkpoint `step` as NumPy, `name` as in `leaf_specs`
    (e.g. 'params/blocks/1/ffn/w_in'); nothing else is restored. The step's digest is checked first."""
    meta = self._checked_meta(step, whole=True)
    spec = meta.get('leaves', {}).get(name)
    if spec is None:
      raise CheckpointMismatchError(f'checkpoint {self.directory}/{step}: no array {name}')
    parts = name.split('/') + ['value']    # nnx Variables are stored as <path>/value
    item: Any = jax.ShapeDtypeStruct(tuple(spec['shape']), np.dtype(spec['dtype']))
    for part in reversed(parts):
      item = {part: item}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
    tree = self.manager.restore(step, args=ocp.args.Composite(state=args))['state']
    for part in parts:
      tree = tree[part]
    return np.asarray(tree)

  def _checked_meta(self, step: int, whole: bool) -> dict[str, Any]:
    """The sidecar of `step` once its digest passes: its own files, or every file (whole)."""
    self.verify(step, prefix='' if whole else 'meta/')
    return self.read_meta(step)

  def _newest_intact(self, step: int | None, read: Callable[[int], Any]) -> Any:
    """read(step), or read(s) for each checkpoint newest first until one succeeds: the one place where
    an unreadable checkpoint is skipped (with a warning naming why) for the previous one, and where the
    writer moves the skipped ones aside once an intact one was read. CheckpointMismatchError (a config
    problem, not damage) is never skipped; CheckpointCorruptError when every checkpoint was (nothing is
    moved then); None when there is none."""
    self.manager.reload()
    if step is not None:
      return read(step)
    damaged, in_flight = [], None
    for s in reversed(self.all_steps()):
      if s in self._damaged:     # found by an earlier read of this Checkpointer: not read or warned again
        damaged.append((s, *self._damaged[s]))
        continue
      try:
        result = read(s)
      except CheckpointMismatchError:
        raise
      except CheckpointInFlightError as e:
        self.skipped[s], in_flight = str(e), e
        _say(f'{e}; reading the previous one')
      except Exception as e:  # noqa: BLE001 (any read failure means: not a usable checkpoint)
        self._damaged[s] = (e, _skip(f'checkpoint {self.directory}/{s}', e))
        damaged.append((s, *self._damaged[s]))
        self.skipped[s] = damaged[-1][2]
      else:
        self._move_aside(damaged)
        return result
    if damaged:
      raise CheckpointCorruptError(f'no intact checkpoint in {self.directory}: ' +
                                   '; '.join(why for _, _, why in damaged) +
                                   ' (nothing was moved or deleted; start afresh with --overwrite or another '
                                   '--ckpt-dir)')
    if in_flight is not None:
      raise in_flight
    return None

  def _move_aside(self, damaged: list[tuple[int, Exception, str]]) -> None:
    """The writer renames each damaged step to `<step>.corrupt-<why>` (process 0; every process waits)."""
    if self._read_only or not self._local or not damaged:
      return
    if jax.process_index() == 0:
      for s, error, why in damaged:
        kind = error.kind if isinstance(error, CheckpointCorruptError) else 'unreadable'
        to = run_folder.move_aside(pathlib.Path(self.directory), s, kind, why)
        self._damaged.pop(s, None)
        _say(f'moved the damaged checkpoint {self.directory}/{s} aside to {to} (step {s} will be saved afresh)')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('litejax checkpoint: damaged steps moved aside')
    self.manager.reload()

  def verify(self, step: int, prefix: str = '') -> None:
    """Checks the files of checkpoint `step` under `prefix` (default: every file) against its digest;
    raises CheckpointCorruptError naming the first file that is missing, resized or changed. Without a
    digest: a reader raises CheckpointInFlightError for the newest step while a live writer holds the run
    lock; otherwise it warns and the step is read unverified. A step that passed is not hashed again by
    this Checkpointer."""
    if not self._local or (step, '') in self._verified or (step, prefix) in self._verified:
      return
    step_dir = pathlib.Path(self.directory) / str(step)
    if not digest.exists(step_dir):
      lock = run_folder.lock_path(pathlib.Path(self.directory))
      if self._read_only and step == self.latest_step() and run_folder.held_by_another(lock):
        raise CheckpointInFlightError(f'checkpoint {step_dir}: its save is not finished (no '
                                      f'{digest.DIGEST_FILE} yet; a running process holds {lock})')
      warnings.warn(f'checkpoint {step_dir} has no {digest.DIGEST_FILE} (cut off after its commit, or written '
                    'by an older litejax): restoring it unverified', RuntimeWarning, stacklevel=3)
      self._verified.add((step, ''))    # warned once: there is nothing to check it against
      return
    damage = digest.first_damage(step_dir, prefix)
    if damage is not None:
      raise CheckpointCorruptError(damage.message, damage.kind)
    self._verified.add((step, prefix))

  def poll(self) -> None:
    """Writes the digest of a save that has finished in the background (the training loop calls this after
    every step, so a reader waits at most a step for a committed checkpoint to count as complete)."""
    step = self._pending
    if step is None or self._digested == step or not self._local or jax.process_index() != 0:
      return
    step_dir = pathlib.Path(self.directory) / str(step)
    if not self.manager.is_saving_in_progress() and step_dir.is_dir():
      digest.write(step_dir)
      self._digested = step

  def wait(self) -> None:
    """Blocks until in-flight saves are on disk (and digested)."""
    self._finish_pending()

  def close(self) -> None:
    try:
      self._finish_pending()
    finally:
      self.manager.close()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    with _write_errors(self, step):
      self.manager.wait_until_finished()
      if step is not None and step != self._digested and self._local and jax.process_index() == 0:
        digest.write(pathlib.Path(self.directory) / str(step))


@contextlib.contextmanager
def _write_errors(ckpt: Checkpointer, step: int | None):
  """Turns an OSError while writing a checkpoint into CheckpointWriteError with one clear line."""
  try:
    yield
  except CheckpointWriteError:
    raise
  except Exception as error:
    cause = error
    while cause is not None and not isinstance(cause, OSError):   # Orbax may wrap the OSError
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    why = 'no space left on device' if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
    prev = ckpt._last_good
    kept = f'the previous checkpoint (step {prev}) is kept' if prev is not None else 'no earlier checkpoint'
    e = CheckpointWriteError(f'writing checkpoint step {step} to {ckpt.directory} failed: {why}; {kept}')
    e.errno = cause.errno
    raise e from error


def _skip(where: str, error: Exception) -> str:
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  msg = f'{where} is unreadable ({type(error).__name__}: {first[:300]}); skipping it and trying an older one'
  warnings.warn(msg, RuntimeWarning, stacklevel=3)   # once on stderr (no logger as well: it printed twice)
  return f'{where}: {first[:300]}'


def _say(message: str) -> None:
  warnings.warn(message, RuntimeWarning, stacklevel=4)
