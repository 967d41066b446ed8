"""The notebooks in experiments/notebooks/ run top to bottom (small sizes), so they cannot rot."""
import os

import nbclient
import nbformat
import pytest

from conftest import REPO

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

NOTEBOOKS = REPO / 'experiments' / 'notebooks'


def execute(name: str, env: dict[str, str], timeout: int) -> str:
  """Runs a notebook with `env` set for its kernel; asserts no error output and a PNG; returns its stdout."""
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  env = {'JAX_PLATFORMS': 'cpu', **env}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)            # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': str(path.parent)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any(o.output_type == 'display_data' and 'image/png' in o.get('data', {}) for o in outputs)
  return ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')


def test_bound_notebook_executes():
  text = execute('bound.ipynb', {'NB_EXPERTS': '8,512,65536'}, timeout=120)
  assert 'PASS experts: gather outside router flat within 1%' in text and 'FAIL' not in text


@pytest.mark.slow
def test_decode_notebook_executes():
  # Trains a tiny model for 2 steps inside the notebook, generates, plots experts per token.
  text = execute('decode.ipynb', {'NB_STEPS': '2', 'NB_NEW_TOKENS': '6'}, timeout=300)
  assert 'experts (2, 6, 4)' in text and 'compiles of the step: 1' in text


def test_tiers_notebook_executes():
  """tiers.ipynb replays the committed decode trace (its first tokens) per policy."""
  text = execute('tiers.ipynb', {'NB_TRACE_TOKENS': '64'}, timeout=120)
  assert '64 decoded tokens' in text and 'PASS lru hit rate grows' in text and 'FAIL' not in text


def test_hf_notebook_executes():
  """hf.ipynb imports the tiny transformers-made Qwen3-MoE fixture, generates, evaluates, plots expert usage."""
  text = execute('hf.ipynb', {'NB_NEW_TOKENS': '4'}, timeout=300)
  assert "'architecture': 'Qwen3MoeForCausalLM'" in text and 'eval: loss 5.' in text
  assert 'tokens per expert, per MoE layer {0:' in text
