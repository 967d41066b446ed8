"""experiments/notebooks/bound.ipynb runs top to bottom (small sizes), so it cannot rot."""
import os
import time

import nbclient
import nbformat

from conftest import REPO

NOTEBOOK = REPO / 'experiments' / 'notebooks' / 'bound.ipynb'


def test_bound_notebook_executes():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = {'NB_EXPERTS': '8,512,65536', 'JAX_PLATFORMS': 'cpu'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)            # the kernel inherits this process's environment
  try:
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=120, kernel_name='python3',
                            resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  assert time.perf_counter() - t0 < 60
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any(o.output_type == 'display_data' and 'image/png' in o.get('data', {}) for o in outputs)
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'PASS experts: gather outside router flat within 1%' in text and 'FAIL' not in text


def test_tiers_notebook_executes():
  """experiments/notebooks/tiers.ipynb replays the committed decode trace (its first tokens) per policy."""
  nb_path = REPO / 'experiments' / 'notebooks' / 'tiers.ipynb'
  nb = nbformat.read(nb_path, as_version=4)
  old = os.environ.get('NB_TRACE_TOKENS')
  os.environ['NB_TRACE_TOKENS'] = '64'
  try:
    nbclient.NotebookClient(nb, timeout=120, kernel_name='python3',
                            resources={'metadata': {'path': str(nb_path.parent)}}).execute()
  finally:
    if old is None:
      os.environ.pop('NB_TRACE_TOKENS', None)
    else:
      os.environ['NB_TRACE_TOKENS'] = old
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  assert any(o.output_type == 'display_data' and 'image/png' in o.get('data', {}) for o in outputs)
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert '64 decoded tokens' in text and 'PASS lru hit rate grows' in text and 'FAIL' not in text
