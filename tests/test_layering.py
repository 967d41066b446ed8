"""The package tree's layering, read from the code's own imports (module- and function-level).

Each package of litejax/ may import only packages below it (and modules of its own package), never in a
cycle; experiments/ scripts import litejax and the shared helper module, never each other; no module
reaches into another's private names; JAX's private APIs live behind litejax.jaxcompat alone; and no
package's __init__ loads JAX (the CLI sets XLA_FLAGS before JAX is imported).
"""
import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Bottom to top. A module of layer i imports modules of layers < i, or of its own package.
LAYERS = [
    ['litejax.config_rules'],
    ['litejax.config'],
    ['litejax.env', 'litejax.units', 'litejax.jaxcompat'],
    ['litejax.sharding'],
    ['litejax.hlo'],
    ['litejax.perf'],
    ['litejax.model'],
    ['litejax.train'],
    ['litejax.inference'],
    ['litejax.hf'],
    ['litejax.analysis'],
    ['litejax.calibrate'],
    ['litejax.commands'],
    ['litejax.cli'],
]
# The one module of experiments/ that scripts share (out folder, JSON, machine facts, plots, subprocesses).
EXPERIMENTS_HELPER = 'harness'
TOP_LEVEL_MODULES_MAX = 10
MAX_LINES = 400


def _modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  out = {}
  for p in sorted((root / package).rglob('*.py')):
    parts = list(p.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = p
  return out


LITEJAX = _modules(REPO, 'litejax')
EXPERIMENTS = {p.stem: p for p in sorted((REPO / 'experiments').glob('*.py'))}


def _imports(path: pathlib.Path, module: str, known: dict) -> list[tuple[str, int]]:
  """(imported module, line) for every import in the file, resolved to the deepest known module."""
  tree = ast.parse(path.read_text())
  is_pkg = path.name == '__init__.py'
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = module.split('.') if is_pkg else module.split('.')[:-1]
        parent = parent[:len(parent) - (node.level - 1)]
        base = '.'.join(parent + ([node.module] if node.module else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition('.')[0]
      if name and name != module:
        found.append((name, node.lineno))
  return found


def _graph(modules: dict) -> dict[str, list[tuple[str, int]]]:
  return {m: _imports(p, m, modules) for m, p in modules.items()}


def _layer(module: str) -> tuple[int, str]:
  for i, packages in enumerate(LAYERS):
    for pkg in packages:
      if module == pkg or module.startswith(pkg + '.'):
        return i, pkg
  raise AssertionError(f'{module}: in no layer of tests/test_layering.py (add it to LAYERS)')


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w, _ in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_in_litejax():
  graph = {m: [(d, n) for d, n in deps if d != 'litejax'] for m, deps in _graph(LITEJAX).items()}
  assert _cycles(graph) == []


def test_every_import_goes_down_the_layering():
  upward = []
  for module, deps in _graph(LITEJAX).items():
    if module == 'litejax':
      continue
    rank, pkg = _layer(module)
    for dep, line in deps:
      if dep == 'litejax':
        continue
      dep_rank, dep_pkg = _layer(dep)
      if dep_pkg != pkg and dep_rank >= rank:
        upward.append(f'{LITEJAX[module].relative_to(REPO)}:{line} imports {dep}')
  assert upward == []


def test_experiments_import_no_other_script():
  known = dict(EXPERIMENTS, **LITEJAX)
  bad = []
  for name, path in EXPERIMENTS.items():
    for dep, line in _imports(path, name, known):
      if dep in EXPERIMENTS and (name == EXPERIMENTS_HELPER or dep != EXPERIMENTS_HELPER):
        bad.append(f'experiments/{name}.py:{line} imports {dep}')
  assert bad == []


def _private_uses(path: pathlib.Path, modules: dict) -> list[str]:
  """`from litejax.x import _y` and `alias._y` where alias names a litejax module, in one file."""
  tree = ast.parse(path.read_text())
  aliases, out = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('litejax'):
      for a in node.names:
        full = f'{node.module}.{a.name}'
        if full in modules:
          aliases[a.asname or a.name] = full
        elif a.name.startswith('_') and not a.name.startswith('__'):
          out.append(f'{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}')
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name in modules and a.asname:
          aliases[a.asname] = a.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith('_') and not node.attr.startswith('__')):
      out.append(f'{path.relative_to(REPO)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}')
  return out


def test_no_private_names_across_modules():
  files = list(LITEJAX.values()) + list(EXPERIMENTS.values()) + sorted((REPO / 'tests').glob('*.py'))
  assert [u for p in files for u in _private_uses(p, LITEJAX)] == []


def test_jax_private_apis_only_in_jaxcompat():
  bad = []
  for path in list(LITEJAX.values()) + list(EXPERIMENTS.values()) + sorted((REPO / 'tests').glob('*.py')):
    if path == REPO / 'litejax' / 'jaxcompat.py':
      continue
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jax._src'):
        bad.append(f'{path.relative_to(REPO)}:{node.lineno} imports {node.module}')
      if isinstance(node, ast.Attribute) and node.attr in ('_cache_size', '_src'):
        bad.append(f'{path.relative_to(REPO)}:{node.lineno} uses .{node.attr}')
  assert bad == []


def test_at_most_ten_top_level_modules_and_none_over_400_lines():
  top = [p.name for p in (REPO / 'litejax').glob('*.py')]
  assert len(top) <= TOP_LEVEL_MODULES_MAX, top
  long = {str(p.relative_to(REPO)): n for p in LITEJAX.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}


@pytest.mark.parametrize('package', sorted(m for m, p in LITEJAX.items() if p.name == '__init__.py'))
def test_package_init_loads_no_jax(package):
  code = f'import sys, {package}; sys.exit(1 if "jax" in sys.modules else 0)'
  assert subprocess.run([sys.executable, '-c', code], cwd=REPO).returncode == 0
