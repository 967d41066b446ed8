"""The wheel ships the configs (issue 11 item 7): installed non-editable into a fresh venv, `litejax params`
finds `--config tiny` from an unrelated folder, and `plan --serve` prices the --hit-rates it is given. The build fetches setuptools>=77
(pyproject's build requirement) from PyPI into pip's isolated build env; the venv sees this environment's dependencies through a
.pth line, so nothing is downloaded."""
import os
import pathlib
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_setuptools_lists_every_subpackage():
  """pyproject.toml lists packages by hand (find cannot see the mapped configs/ folder)."""
  import tomllib
  listed = set(tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']['packages'])
  found = {'.'.join(p.parent.relative_to(REPO).parts) for p in (REPO / 'litejax').rglob('__init__.py')}
  assert found | {'litejax.configs'} == listed


@pytest.mark.slow
def test_wheel_installs_and_finds_its_configs(tmp_path):
  clean = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}   # a checkout on the path looks installed

  def run(*cmd, env=clean, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)
  p = run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-w', str(tmp_path / 'dist'),
          str(REPO))
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  wheel = next((tmp_path / 'dist').glob('litejax-*.whl'))
  p = run(sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'venv'))
  assert p.returncode == 0, p.stderr
  py = tmp_path / 'venv' / 'bin' / 'python'
  purelib = run(str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout.strip()
  p = run(sys.executable, '-m', 'pip', '--python', str(py), 'install', '--no-deps', '--no-index', str(wheel))
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert (py.parent / 'litejax').exists(), p.stdout[-2000:]
  # Then this environment's packages (jax, flax, ...) after the venv's own, without processing their .pth
  # files: an editable litejax installed here stays invisible.
  deps = [sysconfig.get_paths()['purelib'], *site.getsitepackages()]
  (pathlib.Path(purelib) / 'deps.pth').write_text('\n'.join(dict.fromkeys(deps)) + '\n')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {'PATH': f'{py.parent}:/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu', 'HOME': str(tmp_path)}
  p = run(str(py.parent / 'litejax'), 'params', '--config', 'tiny', cwd=elsewhere, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'parameters         total 1.22M' in p.stdout
  where = run(str(py), '-c', 'import litejax; print(litejax.__file__)', cwd=elsewhere, env=env).stdout
  assert where.startswith(purelib), where          # the wheel's copy, not this checkout
  # plan --serve reads no results file of a checkout: without --hit-rates it says there is no I/O term, and
  # with one it prices that file's rates (issue 19 item 5).
  serve = [str(py.parent / 'litejax'), 'plan', '--config', 'quadrillion', '--generation', 'v5p', '--serve']
  p = run(*serve, cwd=elsewhere, env=env)
  assert p.returncode == 0 and 'no I/O term: no --hit-rates given' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
  p = run(*serve, '--hit-rates', str(REPO / 'experiments' / 'results' / 'bench_tiers.json'), cwd=elsewhere, env=env)
  assert p.returncode == 0 and 'bench_tiers.json (lru, 1% device slots' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
