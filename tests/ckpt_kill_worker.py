"""Saves checkpoints of a fixed small state in a loop and is SIGKILLed at a random moment, once per seed.

    python tests/ckpt_kill_worker.py OUT_DIR SEEDS

For each seed a forked child saves `state(step)` at steps 1, 2, ... into OUT_DIR/<seed>/ckpt
(asynchronously, keeping 2) and appends to OUT_DIR/<seed>/committed each step it knows is complete
(its save finished and its digest written); the parent kills it after a random delay. Forking from one
parent that imported jax and Orbax but never started a backend pays the import once, not per seed.
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
    delay = np.random.default_rng(seed).uniform(0.2, 1.0)
    pid = os.fork()
    if pid == 0:
      try:
        child(run_dir)
      finally:
        os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
