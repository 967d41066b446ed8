"""Saves checkpoints of a fixed small state in a loop and is SIGKILLed at a random moment, once per seed.

    python tests/ckpt_kill_worker.py OUT_DIR SEEDS

For each seed a forked child saves `state(step)` at steps 1, 2, ... into OUT_DIR/<seed>/ckpt
(asynchronously, keeping 2) and appends to OUT_DIR/<seed>/committed each step it knows is complete
(its save finished and its digest written); once the first step is logged, the parent kills it after a
random delay (so every kill lands among saves, never before the first one). Forking from one parent
that imported jax and Orbax but never started a backend pays the import once, not per seed.
tests/test_checkpoint_faults.py then restores every folder.
"""
import os
import pathlib
import signal
import sys
import time

import numpy as np


def state(step: int) -> dict:
  """A deterministic state of a few small arrays, different at every step."""
  rng = np.random.default_rng(step)
  return {'params': {'w': rng.standard_normal((64, 32), dtype=np.float32),
                     'b': rng.standard_normal(32, dtype=np.float32)},
          'step': np.int32(step)}


def child(run_dir: pathlib.Path) -> None:
  from litejax.train.checkpoint import Checkpointer
  ck = Checkpointer(run_dir / 'ckpt', keep=2)
  log = (run_dir / 'committed').open('a')
  for step in range(1, 10_000):
    ck.save(step, state(step), {'data': {'next_batch': step}})   # finishes step-1 first
    if step > 1:
      log.write(f'{step - 1}\n')
      log.flush()


def main(out: str, seeds: int) -> None:
  import jax  # noqa: F401  (imported, no backend started: forking is safe)
  import orbax.checkpoint  # noqa: F401
  for seed in range(seeds):
    run_dir = pathlib.Path(out) / str(seed)
    run_dir.mkdir(parents=True)
    delay = np.random.default_rng(seed).uniform(0.0, 0.5)
    pid = os.fork()
    if pid == 0:
      try:
        child(run_dir)
      finally:
        os._exit(0)
    wait_for_first_commit(run_dir / 'committed', pid)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def wait_for_first_commit(log: pathlib.Path, pid: int, timeout_s: float = 120.0) -> None:
  """Returns once the child has logged a complete step; raises if it died or took `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while not (log.exists() and log.read_text().strip()):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      raise RuntimeError(f'{log.parent}: the saving child exited ({status}) before its first checkpoint')
    if time.monotonic() > deadline:
      os.kill(pid, signal.SIGKILL)
      raise RuntimeError(f'{log.parent}: no checkpoint committed within {timeout_s:.0f} s')
    time.sleep(0.01)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
