"""A Hugging Face folder's safetensors weights: what they hold (from the file headers alone), one tensor or one
expert at a time, and writing them back in shards.

Reading goes through `safetensors.safe_open` (the file is memory-mapped; NumPy gets a copy of the one tensor
asked for), opened per read and closed after it, so the pages of a multi-GB shard never stay mapped into
this process: what an import holds is the tensors it is converting, not the shard they came from. bfloat16
tensors read as ml_dtypes' bfloat16 (a JAX dependency).

A folder holds `model.safetensors`, or shards named by `model.safetensors.index.json`'s weight_map.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Callable, Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' NumPy reader needs)
import numpy as np

from litejax.config import InputError

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# safetensors dtype names litejax converts from, and the NumPy dtypes they read as.
DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16)}


class HFError(InputError):
  """A Hugging Face folder litejax cannot convert (or convert to): one line naming the file, tensor or field."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  name: str               # the name in the file
  dtype: str              # safetensors dtype name ('BF16', 'F32', ...)
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * DTYPES[self.dtype].itemsize if self.dtype in DTYPES else 0


class WeightIndex:
  """Every tensor of a folder, by canonical name (`canonical` maps a file's name onto the one the family's
  mapping uses, e.g. Mixtral's block_sparse_moe onto mlp), read from headers only."""

  def __init__(self, tensors: dict[str, TensorInfo]):
    self.tensors = tensors

  @classmethod
  def open(cls, folder: str | pathlib.Path, canonical: Callable[[str], str] = lambda n: n) -> WeightIndex:
    from safetensors import safe_open
    folder = pathlib.Path(folder)
    out: dict[str, TensorInfo] = {}
    for path, names in _files(folder):
      try:
        with safe_open(str(path), 'np') as f:
          keys = list(f.keys())
          specs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
      except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError and OSError)
        raise HFError(f'{path}: not a readable safetensors file ({str(e)[:200]})') from None
      if names is not None and set(names) != set(keys):
        missing, unlisted = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
        raise HFError(f'{folder / INDEX_FILE}: names {missing[0]} in {path.name}, which does not hold it' if missing
                      else f'{path}: holds {unlisted[0]}, which {INDEX_FILE} does not list')
      for k in keys:
        name = canonical(k)
        if name in out:
          raise HFError(f'{path}: tensor {k} is also in {out[name].file.name} (as {out[name].name})')
        out[name] = TensorInfo(path, k, *specs[k])
    for name, t in out.items():
      if t.dtype not in DTYPES:
        raise HFError(f'{t.file.name}: tensor {t.name} is {t.dtype}; litejax converts {sorted(DTYPES)} '
                      '(a quantized checkpoint? use its unquantized release)')
    return cls(out)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name].shape

  def read(self, name: str, index: int | None = None) -> np.ndarray:
    """Tensor `name` (canonical) as NumPy in its stored dtype, or only `[index]` of its first axis."""
    from safetensors import safe_open
    t = self.tensors[name]
    with safe_open(str(t.file), 'np') as f:
      return f.get_tensor(t.name) if index is None else f.get_slice(t.name)[index]

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())


def _files(folder: pathlib.Path) -> list[tuple[pathlib.Path, set[str] | None]]:
  """(file, the names the index assigns to it or None for a single file)."""
  index = folder / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
      files: dict[str, set[str]] = {}
      for name, file in weight_map.items():
        files.setdefault(str(file), set()).add(str(name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise HFError(f'{index}: not a safetensors index with a weight_map ({e})') from None
    for file in files:
      if not (folder / file).is_file():
        raise HFError(f'{index}: names shard {file}, which is not in {folder}')
    return [(folder / f, names) for f, names in sorted(files.items())]
  if (folder / SINGLE_FILE).is_file():
    return [(folder / SINGLE_FILE, None)]
  found = sorted(p.name for p in folder.glob('*.safetensors'))
  hint = f' (it has {", ".join(found[:3])}: shards need {INDEX_FILE})' if found else ''
  raise HFError(f'{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}')


def write_shards(folder: pathlib.Path, tensors: Iterable[tuple[str, Callable[[], np.ndarray], int]],
                 shard_bytes: int, metadata: dict[str, str] | None = None) -> list[str]:
  """Writes (name, make the array, its bytes) in order into safetensors shards of at most `shard_bytes` each
  (one tensor above it gets a shard of its own), as transformers names them, with the index when there is
  more than one. Only one shard's arrays are in memory at a time. Returns the files written."""
  from safetensors.numpy import save_file
  entries = list(tensors)
  shards: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
  size = 0
  for name, make, nbytes in entries:
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, make))
    size += nbytes
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  weight_map = {}
  for file, shard in zip(names, shards):
    save_file({name: np.ascontiguousarray(make()) for name, make in shard}, str(folder / file),
              metadata=metadata or {'format': 'pt'})
    weight_map.update({name: file for name, _ in shard})
  if n > 1:
    total = sum(nbytes for _, _, nbytes in entries)
    (folder / INDEX_FILE).write_text(json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map},
                                                indent=2))
  return names
