"""A training run's folder: what a new run may do to it, and a lock against a second process.

Layout (defaults of `litejax train`; --ckpt-dir and --metrics move the parts):

  runs/<config name>/ckpt/<step>/   Orbax checkpoints (litejax.train.checkpoint), newest `keep_checkpoints`
  runs/<config name>/ckpt.lock      held (flock) by the process training into ckpt/
  runs/<config name>/metrics.jsonl  one JSON object per logged step; metrics.png beside it

Modes: a fresh run refuses a folder that holds a previous run (checkpoints or metrics); `overwrite`
deletes that run's files, but only after every input has been validated and the lock is held;
`resume` needs a checkpoint; `resume_if_possible` resumes when there is one and starts fresh otherwise
(what a preempted job that reruns its own command needs). Nothing here writes before `acquire`.

Who may change a checkpoint folder: only the process holding the run lock (`litejax train`). It saves,
deletes steps past `keep_checkpoints` and a killed save's temporary folder, and moves a damaged step aside
(`move_aside`: renamed, never deleted). Readers (`generate`, `export-experts --ckpt-dir`, the resume
preflight) open the folder read-only and change nothing: they skip a damaged step, and a newest step
whose save a live writer (`held_by_another`) has not finished, for the previous one.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import pathlib
import shutil
import time

from litejax.config import InputError

MODES = ('fresh', 'resume', 'resume_if_possible', 'overwrite')


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Where one run writes. ckpt_dir is None with --no-ckpt; a str for remote stores (gs://...)."""
  ckpt_dir: pathlib.Path | str | None
  metrics: pathlib.Path | None

  @property
  def plot(self) -> pathlib.Path | None:
    return self.metrics.with_suffix('.png') if self.metrics else None

  @property
  def local_ckpt(self) -> pathlib.Path | None:
    return self.ckpt_dir if isinstance(self.ckpt_dir, pathlib.Path) else None


def make_paths(ckpt_dir: str | None, metrics: str | None) -> RunPaths:
  """RunPaths from flag values, remote checkpoint URLs kept as strings."""
  ck = None if ckpt_dir is None else (ckpt_dir if '://' in ckpt_dir else pathlib.Path(ckpt_dir).expanduser())
  return RunPaths(ck, pathlib.Path(metrics).expanduser() if metrics else None)


def checkpoint_steps(ckpt_dir: pathlib.Path | None) -> list[int]:
  """Committed checkpoint steps in a local folder, read from folder names only (nothing is created)."""
  if ckpt_dir is None or not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def check_paths(paths: RunPaths) -> None:
  """Raises InputError when a path cannot be what it is used as (a file as --ckpt-dir, ...)."""
  ck = paths.local_ckpt
  if ck is not None:
    _check_dir('--ckpt-dir', ck)
  if paths.metrics is not None:
    if paths.metrics.is_dir():
      raise InputError(f'--metrics {paths.metrics}: is a folder; expected a .jsonl file path')
    _check_dir('--metrics', paths.metrics.parent)


def _check_dir(flag: str, path: pathlib.Path) -> None:
  for p in (path, *path.parents):
    if p.exists():
      if not p.is_dir():
        raise InputError(f'{flag} {path}: {p} is a file, not a folder')
      if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f'{flag} {path}: {p} is not writable')
      return


def check_mode(paths: RunPaths, mode: str) -> list[int]:
  """Validates `mode` against what the folder holds; returns the checkpoint steps found."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  steps = checkpoint_steps(paths.local_ckpt)
  previous = [str(paths.ckpt_dir)] if steps else []
  if paths.metrics is not None and paths.metrics.exists() and paths.metrics.stat().st_size:
    previous.append(str(paths.metrics))
  if mode == 'fresh' and previous:
    raise InputError(f'{" and ".join(previous)} hold a previous run' +
                     (f' (checkpoints up to step {steps[-1]})' if steps else '') +
                     '; pass --resume to continue it, --overwrite to replace it, or choose another '
                     '--ckpt-dir/--metrics')
  if mode == 'resume' and paths.ckpt_dir is None:
    raise InputError('--resume: needs checkpoints, but --no-ckpt was given')
  if mode == 'resume' and paths.local_ckpt is not None and not steps:
    raise InputError(f'--resume: no checkpoint to resume in {paths.ckpt_dir} (use --resume-if-possible '
                     'to start fresh when there is none)')
  return steps


def lock_path(target: pathlib.Path) -> pathlib.Path:
  """The lock file of a run whose checkpoints (or metrics) are `target`: `<target>.lock` beside it."""
  return target.with_name(target.name + '.lock')


class FolderLock:
  """An exclusive `flock` on a lock file: a second process is refused with `busy` (formatted with the
  holder's pid); the kernel drops the lock when its holder dies, so a killed process never leaves it
  stuck. The file itself (holding the pid, for the message) stays behind, unlocked."""

  def __init__(self, path: pathlib.Path | None, busy: str):
    self.path, self.busy = path, busy
    self._fd: int | None = None

  def acquire(self) -> 'FolderLock':
    if self.path is None:
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(_LOCK_ATTEMPTS):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
          os.close(fd)
          raise
        if attempt + 1 == _LOCK_ATTEMPTS:
          holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'
          os.close(fd)
          raise InputError(self.busy.format(path=self.path, pid=holder)) from None
        time.sleep(_LOCK_RETRY_S)   # a reader's probe (`held_by_another`) holds it for microseconds
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)      # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> 'FolderLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


_LOCK_ATTEMPTS, _LOCK_RETRY_S = 20, 0.01


class RunLock(FolderLock):
  """The run folder's lock, `<ckpt_dir>.lock` (or `<metrics>.lock`), held by the process training into it:
  the one process that may write, clean up or move aside checkpoints there."""

  def __init__(self, paths: RunPaths):
    target = paths.local_ckpt or paths.metrics
    super().__init__(None if target is None else lock_path(target),
                     '{path}: another process (pid {pid}) is training into this run; wait for it or choose '
                     'another --ckpt-dir')


def held_by_another(path: pathlib.Path) -> bool:
  """Whether some process (this one included, through another lock object) holds the lock file at `path`
  (a running writer). Creates nothing: no file, no lock held once it returns."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      return True
    raise
  finally:
    os.close(fd)
  return False


def move_aside(ckpt_dir: pathlib.Path, step: int, why: str, message: str) -> pathlib.Path:
  """Renames the damaged checkpoint `ckpt_dir/<step>` to `<step>.corrupt-<why>` (`.2`, `.3`, ... when taken),
  never deleting it, with the full reason in a text file inside. Only the run's writer (the lock holder)
  calls this; the new name is not a step, so the step can be saved afresh."""
  base = ckpt_dir / f'{step}.corrupt-{why}'
  target, n = base, 1
  while target.exists():
    n += 1
    target = base.with_name(f'{base.name}.{n}')
  os.rename(ckpt_dir / str(step), target)
  (target / MOVED_ASIDE_NOTE).write_text(message + '\n')
  return target


MOVED_ASIDE_NOTE = 'litejax_moved_aside.txt'


def clear_previous(paths: RunPaths) -> list[str]:
  """--overwrite: deletes the previous run's checkpoints, metrics and plot (call with the lock held,
  after validation). Returns what was deleted."""
  gone = []
  ck = paths.local_ckpt
  if ck is not None and ck.exists():
    shutil.rmtree(ck)
    gone.append(str(ck))
  for f in (paths.metrics, paths.plot):
    if f is not None and f.exists():
      f.unlink()
      gone.append(str(f))
  return gone
