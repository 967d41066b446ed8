"""Multi-host path on one machine: 2 processes × 4 CPU devices (gloo collectives, jax.distributed)
train the same 5 steps as 1 process × 8 devices, expert-parallel across the two processes, and write
one checkpoint collectively."""
import socket
import subprocess
import sys

import numpy as np
import pytest

from litejax.train import loop as train_lib
from litejax.config import load_config
from litejax.train.metrics import read_metrics
from train_helpers import TINY, TINY_YAML, enable_compile_cache, subprocess_env

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

# mesh.expert=8: expert parallelism spans both processes, so the all-to-all crosses the gloo link.
RUN = TINY + ['train.steps=30', 'train.eval_every=10', 'train.ckpt_every=10', 'mesh.expert=8']
enable_compile_cache()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = free_port()
  cmd = [sys.executable, '-m', 'litejax.cli', 'train', '--config', str(TINY_YAML), '--devices', '4',
         '--distributed', '--coordinator', f'localhost:{port}', '--num-processes', '2', '--quiet',
         '--stop-after', '5', '--ckpt-dir', str(tmp_path / 'ckpt'), '--metrics', str(tmp_path / 'm.jsonl'),
         *[a for o in RUN for a in ('--set', o)]]
  procs = [subprocess.Popen(cmd + ['--process-id', str(i)], env=subprocess_env(None), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  # Meanwhile, the single-process reference on this process's 8 devices.
  ref = train_lib.train(load_config(TINY_YAML, RUN), stop_after=5, quiet=True)
  for i, p in enumerate(procs):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, f'process {i}:\n{err[-3000:]}'
  got = [r['loss'] for r in read_metrics(tmp_path / 'm.jsonl')]
  want = [r['loss'] for r in ref.history]
  assert len(got) == len(want) == 5
  # Same global batch, same shardings: only the cross-process reduction order may differ.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert (tmp_path / 'ckpt' / '5' / 'commit_success.txt').exists() or (tmp_path / 'ckpt' / '5').is_dir()
