"""Multi-host path on one machine: 2 processes × 4 CPU devices (gloo collectives, jax.distributed)
train the same 5 steps as 1 process × 8 devices, expert-parallel across the two processes, and write
one checkpoint collectively: restored, it holds the single-process run's state."""
import socket
import subprocess
import sys

import numpy as np
import pytest

from litejax import sharding as shd
from litejax.train import loop as train_lib, step as train_step
from litejax.train.checkpoint import Checkpointer
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
  cfg = load_config(TINY_YAML, RUN)
  ref = train_lib.train(cfg, ckpt_dir=tmp_path / 'ref', stop_after=5, quiet=True)
  for i, p in enumerate(procs):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, f'process {i}:\n{err[-3000:]}'
  got = [r['loss'] for r in read_metrics(tmp_path / 'm.jsonl')]
  want = [r['loss'] for r in ref.history]
  assert len(got) == len(want) == 5
  # Same global batch, same shardings: only the cross-process reduction order may differ.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The checkpoint the two processes wrote, restored here onto 8 devices, is the reference run's state.
  _, abstract, _ = train_step.state_layout(cfg, shd.make_mesh(cfg.mesh))
  got, want = (_restore(tmp_path / d, abstract) for d in ('ckpt', 'ref'))
  assert got.step == want.step == 5 and int(got.state['step']) == 5
  assert got.meta['process_count'] == 2 and want.meta['process_count'] == 1
  assert got.meta['config'] == want.meta['config'] and got.meta['data'] == want.meta['data']
  flat_got, flat_want = _flat(got.state), _flat(want.state)
  assert sorted(flat_got) == sorted(flat_want)
  for k, v in flat_want.items():
    np.testing.assert_allclose(flat_got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def _restore(directory, abstract):
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.restore(abstract)
  finally:
    ckpt.close()


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
