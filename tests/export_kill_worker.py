"""Runs `litejax export-experts --ckpt-dir CKPT --out OUT/<seed>/store` in a forked child per seed and SIGKILLs it
at a random moment of the export.

    python tests/export_kill_worker.py CKPT OUT SEEDS

A first child runs the command to the end and its wall time T is measured; then for each seed a child is
killed after a delay drawn uniformly from [0, T) (seeded), so the kills land anywhere from opening the
checkpoint to writing the manifest. A child that finishes first writes OUT/<seed>/finished. Forking from one
parent that imported the command's modules (jax and Orbax included, no backend started) pays the imports
once. tests/test_export_experts.py then checks every folder and reruns the command.
"""
import os
import pathlib
import signal
import sys
import time

import numpy as np


def export(ckpt: str, run_dir: pathlib.Path) -> None:
  from litejax import cli
  rc = cli.main(['export-experts', '--ckpt-dir', ckpt, '--out', str(run_dir / 'store')])
  if rc == 0:
    (run_dir / 'finished').write_text('')


def fork_export(ckpt: str, run_dir: pathlib.Path) -> int:
  run_dir.mkdir(parents=True)
  pid = os.fork()
  if pid == 0:
    try:
      export(ckpt, run_dir)
    finally:
      os._exit(0)
  return pid


def main(ckpt: str, out: str, seeds: int) -> None:
  import jax  # noqa: F401  (imported, no backend started: forking is safe)
  import orbax.checkpoint  # noqa: F401

  from litejax.commands import export_experts  # noqa: F401
  from litejax.inference.store import from_checkpoint  # noqa: F401
  t0 = time.monotonic()
  pid = fork_export(ckpt, pathlib.Path(out) / 'reference')
  os.waitpid(pid, 0)
  whole_s = time.monotonic() - t0
  assert (pathlib.Path(out) / 'reference' / 'finished').exists(), 'the reference export failed'
  print(f'reference export: {whole_s:.2f} s', flush=True)
  for seed in range(seeds):
    delay = np.random.default_rng(seed).uniform(0.0, whole_s)
    pid = fork_export(ckpt, pathlib.Path(out) / str(seed))
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
