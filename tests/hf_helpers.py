"""The Hugging Face fixtures (tests/fixtures/hf, made by transformers: experiments/hf_fixtures.py) and helpers."""
import pathlib
import shutil

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'hf'
FAMILIES = {'mixtral': ('per_expert', 'fused'), 'qwen3_moe': ('per_expert', 'fused'), 'qwen3_moe_tied': ('per_expert',),
            'deepseek_v3': ('per_expert', 'fused')}
# Fixtures whose recorded expert ids are sorted ascending (DeepSeek's router picks its top-k unordered).
UNORDERED_EXPERTS = ('deepseek_v3',)
EVAL_TEXT = FIXTURES / 'eval.txt'
TOL = 1e-4


def reference(name: str) -> dict:
  with np.load(FIXTURES / name / 'reference.npz') as z:
    return {k: z[k] for k in z.files}


def prompts(ref: dict) -> list[np.ndarray]:
  return [ref[f'tokens_{i}'] for i in range(sum(k.startswith('tokens_') for k in ref))]


def import_all(tmp: pathlib.Path, seq_len: int = 16) -> dict[tuple[str, str], pathlib.Path]:
  """{(family, layout): checkpoint folder} of every fixture folder, imported into `tmp`."""
  from litejax.hf.importer import import_hf
  out = {}
  for name, layouts in FAMILIES.items():
    for layout in layouts:
      out[name, layout] = tmp / f'{name}_{layout}'
      import_hf(FIXTURES / name / layout, out[name, layout], seq_len=seq_len)
  return out


def copy_fixture(name: str, layout: str, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(FIXTURES / name / layout, dst)
  return dst


def leaves(ckpt_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Every saved parameter of a checkpoint folder's newest step as NumPy, by leaf name: one Orbax restore of
  them all (the reader's read_leaf does one restore per leaf)."""
  import jax
  import orbax.checkpoint as ocp

  from litejax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    step, meta = ckpt.newest_meta(whole=True)
    names = [n for n in meta['leaves'] if n.startswith('params/')]
    item: dict = {}
    for name in names:
      node = item
      *parents, last = name.split('/')
      for part in parents:
        node = node.setdefault(part, {})
      spec = meta['leaves'][name]
      node[last] = {'value': jax.ShapeDtypeStruct(tuple(spec['shape']), np.dtype(spec['dtype']))}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
    tree = ckpt.manager.restore(step, args=ocp.args.Composite(state=args))['state']
    out = {}
    for name in names:
      node = tree
      for part in name.split('/'):
        node = node[part]
      out[name] = np.asarray(node['value'])
    return out
  finally:
    ckpt.close()


def assert_same_leaves(a: pathlib.Path, b: pathlib.Path) -> None:
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


def assert_same_experts(name: str, got: np.ndarray, want: np.ndarray) -> None:
  """The same expert ids per token: in transformers' order (best first), or as sets for UNORDERED_EXPERTS."""
  np.testing.assert_array_equal(np.sort(got, -1) if name in UNORDERED_EXPERTS else got, want)
