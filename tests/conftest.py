"""Test setup: an emulated 8-device CPU mesh, configured before JAX is imported anywhere."""
import os

# The tests' programs are tiny: XLA:CPU's LLVM optimisation is most of their compile time and buys nothing
# at these shapes (--xla_backend_optimization_level=0: the cold suite on 2 cores went from 12 min 55 s and
# 24.0 CPU-minutes to 10 min 31 s and 19.0, measured side by side; HLO, cost analysis and buffer
# assignment, which the bound tests read, are unchanged).
_FLAGS = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _FLAGS:
  _FLAGS += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (_FLAGS + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for every test process and the children they start (they inherit the
# environment), keyed by the HLO, flags and jax version. A rerun in the same checkout reads most programs
# from it (about half the suite's CPU time, measured warm); a cold run (CI) gains nothing measurable from it
# (12 min 50 s without, 12 min 55 s with, side by side): its identical programs are already shared in memory.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax-compile-cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs'


def all_config_files():
  return sorted(CONFIG_DIR.glob('*.yaml'))


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  return REPO


def import_experiment(name: str):
  """experiments/<name>.py as a module, with experiments/ on sys.path (its scripts import `harness`)."""
  import importlib
  import sys
  folder = str(REPO / 'experiments')
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(name)

