"""The disk level: every routed expert of every MoE layer in TensorStore zarr3 arrays, one chunk per expert.

Chunks are uncompressed (the `bytes` codec, then `crc32c`), so a chunk file is exactly one expert's array
plus its 4-byte checksum, and reading expert e reads those bytes and no more (tests/test_store_disk.py
measures it with TensorStore's own kvstore byte counters). TensorStore's chunk cache is off (the default
context): caching is the host level's job, with a budget it controls.

Every read is checked: TensorStore verifies each chunk's CRC-32C as it decodes it, and arrays are opened
with `fill_missing_data_reads: false` (zarr3 would otherwise return the fill value for a chunk that was
never written, and a half-exported store would decode with zero experts). A failed read becomes a
`ChunkDamagedError` naming the layer, array and expert (`ExpertStore.diagnose`); `damaged_chunks` checks
a whole store (`litejax export-experts --verify`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from litejax.config import Config
from litejax.inference.store import layout
from litejax.inference.store.layout import ChunkDamagedError, ExpertStoreError


def kvstore_spec(location: str) -> Any:
  """A TensorStore kvstore for a store location: a URL (memory://, file:///..., gs://...) as given,
  anything else a local directory."""
  if '://' in location:
    return location if location.endswith('/') else location + '/'
  return {'driver': 'file', 'path': str(pathlib.Path(location).expanduser().absolute()) + '/'}


def open_kvstore(location: str, context: ts.Context) -> ts.KvStore:
  return ts.KvStore.open(kvstore_spec(location), context=context).result()


def zarr_spec(location: str, layer: int, name: str) -> dict[str, Any]:
  spec = kvstore_spec(location)
  path = layout.array_path(layer, name) + '/'
  kv = {'driver': 'file', 'path': spec['path'] + path} if isinstance(spec, dict) else spec + path
  return {'driver': 'zarr3', 'kvstore': kv}


def read_manifest(location: str, context: ts.Context) -> dict[str, Any] | None:
  """The manifest, or None when LOCATION holds none."""
  result = open_kvstore(location, context).read(layout.MANIFEST).result()
  if result.state != 'value':
    return None
  try:
    return json.loads(bytes(result.value))
  except ValueError as e:
    raise ExpertStoreError(f'expert store {location}: {layout.MANIFEST} is not valid JSON ({e})') from None


class PendingRead:
  """Reads of some experts of one layer in flight; `result()` waits and returns {name: [n, ...]}."""

  def __init__(self, store: 'ExpertStore', layer: int, ids: np.ndarray, futures: dict[str, ts.Future],
               inverse: np.ndarray):
    self.store, self.layer, self.ids, self.futures, self.inverse = store, layer, ids, futures, inverse
    self.counted = False     # set by the reader that accounts for this read (litejax.inference.store.levels)
    self._value: dict[str, np.ndarray] | None = None

  def done(self) -> bool:
    return all(f.done() for f in self.futures.values())

  def result(self) -> dict[str, np.ndarray]:
    """Waits (once; later calls return the same arrays)."""
    if self._value is None:
      try:
        self._value = {name: np.asarray(f.result())[self.inverse] for name, f in self.futures.items()}
      except ValueError:
        # One batched read failed: read the experts one by one to name the first damaged chunk.
        raise self.store.diagnose(self.layer, self.ids) from None
    return self._value


class ExpertStore:
  """A validated, opened expert store. `read_experts(layer, ids)` -> {'w_in': [n, d, h], ...}."""

  def __init__(self, location: str, manifest: dict[str, Any], arrays: dict[int, dict[str, ts.TensorStore]]):
    self.location, self.manifest, self.arrays = location, manifest, arrays
    self.layers: list[int] = list(manifest['layers'])
    self.num_experts: int = int(manifest['experts_per_layer'])
    self.experts_per_group: int = int(manifest['experts_per_group'])
    self.expert_bytes: int = int(manifest['expert_bytes'])
    self.dtype = _dtype(manifest['dtype'])
    self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in manifest['arrays'].items()}
    # What reading one expert reads from disk: its arrays and one checksum per array.
    self.chunk_bytes_per_expert: int = self.expert_bytes + layout.CHECKSUM_BYTES * len(self.shapes)

  @staticmethod
  def read_source(location: str) -> dict[str, Any]:
    """The manifest's `source` (where the experts came from: a checkpoint or an initialisation), or {}
    when LOCATION holds no manifest (then `open` raises the error that says so)."""
    manifest = read_manifest(str(location), ts.Context())
    return dict((manifest or {}).get('source', {}))

  @classmethod
  def open(cls, location: str, cfg: Config | None = None, context: ts.Context | None = None) -> 'ExpertStore':
    """Opens LOCATION and checks it against its manifest and, when given, `cfg` (same model and moe
    sections). Raises ExpertStoreError naming what does not match."""
    location = str(location)
    context = context or ts.Context()
    manifest = read_manifest(location, context)
    if manifest is None:
      raise ExpertStoreError(f'expert store {location}: no {layout.MANIFEST} (not an expert store, or its '
                             'export did not finish; rerun `litejax export-experts`)')
    if manifest.get('format') == layout.FORMAT and manifest.get('format_version') == 1:
      raise ExpertStoreError(f'expert store {location}: format version 1, written before every chunk carried a '
                             f'checksum; this litejax reads version {layout.FORMAT_VERSION}: re-export it with `'
                             f'{layout.reexport_hint(location, manifest.get("source", {}))}`')
    if manifest.get('format') != layout.FORMAT or manifest.get('format_version') != layout.FORMAT_VERSION:
      raise ExpertStoreError(f'expert store {location}: format {manifest.get("format")!r} version '
                             f'{manifest.get("format_version")!r}; this litejax reads {layout.FORMAT!r} version '
                             f'{layout.FORMAT_VERSION}')
    if cfg is not None and manifest.get('config_digest') != layout.config_digest(cfg):
      diff = layout.config_difference(manifest.get('config', {}), layout.architecture(cfg))
      raise ExpertStoreError(f'expert store {location} was written for another config ({diff}); export the '
                             'experts of this config or decode with the config the store was written from')
    dtype = _dtype(manifest['dtype'])
    arrays = {}
    for layer in manifest['layers']:
      arrays[layer] = {}
      for name, shape in manifest['arrays'].items():
        arrays[layer][name] = _open_array(location, layer, name, [manifest['experts_per_layer'], *shape],
                                          dtype, context)
    return cls(location, manifest, arrays)

  def _check(self, layer: int, ids: Sequence[int]) -> np.ndarray:
    if layer not in self.arrays:
      raise ExpertStoreError(f'expert store {self.location}: layer {layer} is not an MoE layer of this store '
                             f'(layers {self.layers})')
    ids_n = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids_n[(ids_n < 0) | (ids_n >= self.num_experts)]
    if bad.size:
      raise ExpertStoreError(f'expert store {self.location}: layer {layer} expert {int(bad[0])} is out of '
                             f'range [0, {self.num_experts})')
    return ids_n

  def read_experts_async(self, layer: int, ids: Sequence[int]) -> PendingRead:
    """Starts reading experts `ids` of `layer` (all arrays, one batched read each) and returns at once;
    a prefetch thread overlaps these reads with compute and calls `.result()` when it needs them."""
    ids_n = self._check(layer, ids)
    unique_u, inverse_n = np.unique(ids_n, return_inverse=True)   # a repeated id is read once
    futures = {name: arr[unique_u].read() for name, arr in self.arrays[layer].items()}
    return PendingRead(self, layer, ids_n, futures, inverse_n)

  def read_experts(self, layer: int, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """{name: [n, ...]} for experts `ids` of `layer`, in the order given; a repeated id is read once."""
    return self.read_experts_async(layer, ids).result()

  def diagnose(self, layer: int, ids: np.ndarray) -> ExpertStoreError:
    """The error for the first expert of `ids` that cannot be read (a ChunkDamagedError: missing, short or
    checksum differs)."""
    for e in dict.fromkeys(int(i) for i in ids):
      for name in self.arrays[layer]:
        damage = self._chunk_damage(layer, name, e)
        if damage is not None:
          return damage
    return ExpertStoreError(f'expert store {self.location}: layer {layer}: a read of experts {ids.tolist()} '
                            'failed but each expert reads alone (a transient I/O error?)')

  def _chunk_damage(self, layer: int, name: str, expert: int) -> ChunkDamagedError | None:
    try:
      self.arrays[layer][name][expert].read().result()
    except ValueError as err:
      return ChunkDamagedError(f'expert store {self.location}: layer {layer} expert {expert}: {name} '
                               f'{_why(str(err))}', layer, name, expert)
    return None

  def damaged_chunks(self, layer: int | None = None, block: int = 256) -> list[ChunkDamagedError]:
    """Reads every chunk (of one layer, or all) and returns one error per damaged chunk (missing, short,
    or its checksum differs), in (layer, array, expert) order; [] when the store is intact."""
    found = []
    for l in ([layer] if layer is not None else self.layers):
      self._check(l, [])
      for name, arr in self.arrays[l].items():
        for start in range(0, self.num_experts, block):
          stop = min(start + block, self.num_experts)
          try:
            arr[start:stop].read().result()
          except ValueError:     # some chunk of the block: find each one
            found += [d for d in (self._chunk_damage(l, name, e) for e in range(start, stop)) if d is not None]
    return found

  def verify(self, layer: int | None = None) -> None:
    """Reads every expert (of one layer, or all), raising the first damaged chunk's ChunkDamagedError."""
    damaged = self.damaged_chunks(layer)
    if damaged:
      raise damaged[0]


def _why(message: str) -> str:
  first = message.strip().splitlines()[0] if message.strip() else ''
  if 'DATA_LOSS' in first or 'Digest mismatch' in first:
    return f'chunk is damaged: its CRC-32C checksum differs from when it was written ({first[:200]})'
  if 'NOT_FOUND' in first or 'is missing' in first:
    return f'chunk is missing: the store is truncated or was not completely written ({first[:200]})'
  if 'Not enough data' in first or 'size' in first:
    return f'chunk is short: the store is truncated or corrupt ({first[:200]})'
  return f'chunk cannot be read ({first[:200]})'


def _dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _open_array(location: str, layer: int, name: str, shape: list[int], dtype: np.dtype,
                context: ts.Context) -> ts.TensorStore:
  where = f'expert store {location}: layer {layer} {name}'
  try:
    arr = ts.open(dict(zarr_spec(location, layer, name), fill_missing_data_reads=False), open=True,
                  context=context).result()
  except ValueError as e:
    raise ExpertStoreError(f'{where}: cannot open ({str(e).splitlines()[0][:200]}); the store is incomplete') \
        from None
  if list(arr.shape) != list(shape):
    raise ExpertStoreError(f'{where} has shape {tuple(arr.shape)}, the manifest says {tuple(shape)}')
  if np.dtype(arr.dtype.numpy_dtype) != dtype:
    raise ExpertStoreError(f'{where} has dtype {arr.dtype.name}, the manifest says {dtype}')
  chunk = list(arr.chunk_layout.read_chunk.shape)
  if chunk != [1, *shape[1:]]:
    raise ExpertStoreError(f'{where} has chunks {tuple(chunk)}, not one expert per chunk {(1, *shape[1:])}')
  codecs = [c['name'] for c in arr.codec.to_json().get('codecs', [])]
  want = [c['name'] for c in layout.CODECS]
  if codecs != want:
    raise ExpertStoreError(f'{where} has codecs {codecs}, not {want}: an expert store is uncompressed, so one '
                           'expert reads exactly its bytes, and checksummed, so a damaged chunk is detected')
  return arr
