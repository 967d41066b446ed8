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


@dataclasses.dataclass(frozen=True)
class OutTensor:
  """A tensor to write: its name, shape and dtype up front (they go in the file's header), its values on demand."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


_SAFETENSORS_DTYPE = {v: k for k, v in DTYPES.items()}


def write_shards(folder: pathlib.Path, tensors: Iterable[OutTensor], shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
  """Writes `tensors` in order into safetensors shards of at most `shard_bytes` each (a larger tensor gets a
  shard of its own), named as transformers names them, with the index when there is more than one. The
  header of each file is written first (every shape is known), then each tensor as it is made: one tensor
  is in memory at a time. Returns the files written."""
  entries = list(tensors)
  shards: list[list[OutTensor]] = [[]]
  size = 0
  for t in entries:
    if shards[-1] and size + t.nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  for file, shard in zip(names, shards):
    _write_file(folder / file, shard, metadata or {'format': 'pt'})
  if n > 1:
    weight_map = {t.name: file for file, shard in zip(names, shards) for t in shard}
    index = {'metadata': {'total_size': sum(t.nbytes for t in entries)}, 'weight_map': weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return names


def _write_file(path: pathlib.Path, tensors: list[OutTensor], metadata: dict[str, str]) -> None:
  """One safetensors file: an 8-byte little-endian header length, the JSON header (dtype, shape and byte range
  of each tensor in the data that follows), padded with spaces to a multiple of 8, then the tensors' bytes."""
  header: dict = {'__metadata__': metadata}
  offset = 0
  for t in tensors:
    header[t.name] = {'dtype': _SAFETENSORS_DTYPE[np.dtype(t.dtype)], 'shape': list(t.shape),
                      'data_offsets': [offset, offset + t.nbytes]}
    offset += t.nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  with path.open('wb') as f:
    f.write(len(text).to_bytes(8, 'little'))
    f.write(text)
    for t in tensors:
      x = np.ascontiguousarray(t.make())
      if x.shape != tuple(t.shape) or x.dtype != np.dtype(t.dtype):
        raise AssertionError(f'{t.name}: made {x.dtype} {x.shape}, announced {np.dtype(t.dtype)} {tuple(t.shape)}')
      f.write(x.reshape(-1).view(np.uint8))
