"""The shrunk tiny_1k checkpoint and its store, trained once per test run and shared by the --quick runs of
bench_tiers.py, tierset_latency.py and lookahead_recall.py (each used to train and export its own copy).

Under pytest-xdist every worker is its own session: the copy lives in the run's shared temporary root
and an flock makes the first worker build it while the others wait, so a run trains it exactly once.
"""
import fcntl
import pathlib
import subprocess
import sys

from conftest import REPO
from train_helpers import COMPILE_CACHE, subprocess_env


def env() -> dict[str, str]:
  """A one-device CPU child process sharing the tests' persistent compile cache: the scripts compile many
  of the same decode programs (and the training tests' train step)."""
  COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
  return subprocess_env(None)


def checkpoint(tmp_path_factory) -> pathlib.Path:
  """CKPT (CKPT/../store holds its experts): experiments/harness.ensure_checkpoint's --quick training, then
  the store export of harness.load_store_model, so the scripts only read both."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith('popen-gw'):    # xdist worker: its basetemp's parent is shared by the run
    root = root.parent
  work = root / 'tiny_1k_quick'
  ckpt = work / 'ckpt'
  with open(root / 'tiny_1k_quick.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (work / 'store' / 'manifest.json').exists():
      code = ('import pathlib, sys; sys.path.insert(0, "experiments"); import harness; '
              'from litejax.inference.store.from_checkpoint import write_from_checkpoint; '
              f'p = pathlib.Path({str(ckpt)!r}); harness.ensure_checkpoint(p, True); '
              'write_from_checkpoint(str(p.parent / "store"), str(p), overwrite=True)')
      subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=env(), timeout=900)
  return ckpt
