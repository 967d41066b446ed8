"""Test setup: an emulated 8-device CPU mesh, configured before JAX is imported anywhere."""
import os

# The tests' programs are tiny: XLA:CPU's LLVM optimisation is most of their compile time and buys nothing
# at these shapes (--xla_backend_optimization_level=0: the suite's CPU time 23% less on the compile-heavy
# tests, measured; HLO, cost analysis and buffer assignment, which the bound tests read, are unchanged).
_FLAGS = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _FLAGS:
  _FLAGS += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (_FLAGS + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run, this process and every child it starts (they inherit
# the environment): many tests jit fresh closures of the same small programs (a model's init, forward, train
# step) and xdist's two workers build the same fixtures, so from a cold checkout most compiles after the
# first of each program are cache reads. Keyed by the HLO, flags and jax version; every program is cached.
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

