"""Two processes × 4 CPU devices (gloo collectives on localhost) train like one process × 8 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

from litejax import sharding
from litejax.config import MeshConfig
from mp_train import tiny_config, train_losses

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  port, out = _free_port(), tmp_path / 'losses.json'
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = os.pathsep.join([str(HERE), env.get('PYTHONPATH', '')])
  log_paths = [tmp_path / f'proc{i}.log' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(HERE / 'mp_train.py'), str(i), '2', str(port), str(out)],
                            env=env, stdout=open(log_paths[i], 'w'), stderr=subprocess.STDOUT)
           for i in range(2)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:          # always stop: a hung peer must not outlive the test
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), '\n\n'.join(x.read_text()[-3000:] for x in log_paths)
  result = json.loads(out.read_text())
  assert (result['devices'], result['local']) == (8, 4)

  ref, _ = train_losses(tiny_config(), sharding.make_mesh(MeshConfig(data=2, expert=4, tensor=1)))
  np.testing.assert_allclose(result['losses'], ref, rtol=1e-5)
