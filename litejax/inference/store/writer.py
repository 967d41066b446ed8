"""Writing an expert store: from arrays, from a training checkpoint, or randomly initialised.

Writes go layer by layer in blocks of experts, so neither the model nor (for a large layer) one whole
layer is ever in memory: `write_random` holds at most two blocks (one being generated, one being
written). The manifest is written last; a store whose export was cut off (killed, or a failed write such as
a full disk: `StoreWriteError`, one line) has none and does not open, and the next export into it needs
--overwrite. A local store is written under an flock on STORE/export.lock (litejax.train.run_folder's
FolderLock), so a second export into the same folder is refused while the first runs, and a killed one
never leaves it locked.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import pathlib
from typing import Any, Callable

import numpy as np
import tensorstore as ts

from litejax.config import Config, ConfigError
from litejax.inference.store import layout
from litejax.inference.store.disk import ExpertStore, open_kvstore, read_manifest, zarr_spec
from litejax.inference.store.layout import ExpertStoreError, StoreWriteError
from litejax.train.run_folder import FolderLock, held_by_another

DEFAULT_BLOCK_BYTES = 64 << 20


def check_destination(location: str, overwrite: bool, context: ts.Context, holding_lock: bool = False) -> None:
  """Raises unless LOCATION is new/empty, or holds an expert store (complete or not) and `overwrite`, and
  (unless this caller is `holding_lock`) no other export holds its lock. Never writes: called before anything
  is written."""
  if '://' not in location:
    p = pathlib.Path(location).expanduser()
    if p.exists() and not p.is_dir():
      raise ExpertStoreError(f'--out {location}: exists and is not a directory')
    if not holding_lock and held_by_another(p / layout.LOCK):
      raise ExpertStoreError(f'--out {location}: another export-experts (pid {_holder(p / layout.LOCK)}) is writing '
                             'this store; wait for it or choose another --out')
    if not p.exists() or not [q for q in p.iterdir() if q.name != layout.LOCK]:
      return
    complete = (p / layout.MANIFEST).exists()
    is_store = complete or (p / 'experts').is_dir()
  else:
    kv = open_kvstore(location, context)
    if not kv.list().result():
      return
    complete = read_manifest(location, context) is not None
    is_store = complete or bool(kv.list(ts.KvStore.KeyRange('experts/', 'experts0')).result())
  if not is_store:
    raise ExpertStoreError(f'--out {location}: is not empty and holds no expert store; refusing to write into it')
  if not overwrite and complete:
    raise ExpertStoreError(f'--out {location}: already holds an expert store; pass --overwrite to replace it')
  if not overwrite:
    raise ExpertStoreError(f'--out {location}: holds an incomplete expert store (an export that did not finish: '
                           f'no {layout.MANIFEST}); pass --overwrite to replace it')


def _holder(lock: pathlib.Path) -> str:
  try:
    return lock.read_text().strip() or '?'
  except OSError:
    return '?'


class StoreWriter:
  """Creates every array of a store (nothing written yet), takes blocks of experts, writes the manifest
  on `finish`."""

  def __init__(self, location: str, cfg: Config, *, overwrite: bool = False, context: ts.Context | None = None):
    self.location, self.cfg = str(location), cfg
    self.context = context or ts.Context()
    if not layout.moe_layers(cfg):
      raise ConfigError('model.moe_every: the config has no MoE layer, so there are no experts to store')
    check_destination(self.location, overwrite, self.context)
    local = '://' not in self.location
    self.lock = FolderLock(pathlib.Path(self.location).expanduser() / layout.LOCK if local else None,
                           f'--out {self.location}: another export-experts (pid {{pid}}) is writing this store; '
                           'wait for it or choose another --out').acquire()
    try:
      check_destination(self.location, overwrite, self.context, holding_lock=True)   # again, now that it is ours
      with self._errors('clearing it'):
        kv = open_kvstore(self.location, self.context)
        kv.write(layout.MANIFEST, None).result()   # delete first: a store being replaced stops opening at once
        kv.delete_range(ts.KvStore.KeyRange('experts/', 'experts0')).result()
        e, dtype = cfg.moe.experts_total, layout.param_dtype(cfg)
        self.arrays = {}
        for layer in layout.moe_layers(cfg):
          self.arrays[layer] = {name: _create(self.location, layer, name, [e, *shape], dtype, self.context)
                                for name, shape in layout.expert_shapes(cfg).items()}
    except BaseException:
      self.close()
      raise

  def write_array(self, layer: int, name: str, start: int, x: np.ndarray) -> ts.Future:
    """Starts writing experts start..start+n of one array; returns the commit future."""
    arr = self.arrays[layer][name]
    return arr[start:start + x.shape[0]].write(x.astype(arr.dtype.numpy_dtype, copy=False)).commit

  def write_async(self, layer: int, start: int, block: dict[str, np.ndarray]) -> list[ts.Future]:
    """Starts writing experts start..start+n of `layer` ({name: [n, ...]}, any subset of the arrays);
    returns the write futures (wait on them with `wait`)."""
    n = next(iter(block.values())).shape[0] if block else 0
    with self._errors(f'layer {layer} experts {start}..{start + n - 1}'):
      return [self.write_array(layer, name, start, x) for name, x in block.items()]

  def wait(self, futures: list[ts.Future]) -> None:
    """Waits for writes; a failed one (e.g. a full disk) is a StoreWriteError."""
    with self._errors('writing experts'):
      for f in futures:
        f.result()

  def write(self, layer: int, start: int, block: dict[str, np.ndarray]) -> None:
    self.wait(self.write_async(layer, start, block))

  def finish(self, source: dict[str, Any]) -> ExpertStore:
    """Writes the manifest (the store is complete from here on), releases the lock and returns the store,
    reopened."""
    manifest = layout.make_manifest(self.cfg, source)
    try:
      with self._errors(f'writing {layout.MANIFEST}'):
        kv = open_kvstore(self.location, self.context)
        kv.write(layout.MANIFEST, json.dumps(manifest, indent=1).encode()).result()
    finally:
      self.close()
    return ExpertStore.open(self.location, self.cfg, context=self.context)

  def close(self) -> None:
    """Releases the lock (an unfinished store stays incomplete: no manifest)."""
    self.lock.release()

  @contextlib.contextmanager
  def _errors(self, what: str):
    try:
      yield
    except (OSError, ValueError) as e:
      if isinstance(e, ExpertStoreError):
        raise
      text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in text
      why = 'no space left on device' if full else text[:300]
      raise StoreWriteError(f'writing expert store {self.location} failed ({what}): {why}; the store is incomplete '
                            f'(no {layout.MANIFEST}, so nothing opens it): free space and rerun with --overwrite') \
          from None


def _create(location: str, layer: int, name: str, shape: list[int], dtype: np.dtype,
            context: ts.Context) -> ts.TensorStore:
  # Every chunk is written, an all-zero expert too (by default TensorStore skips chunks equal to the fill
  # value, and the reader, which refuses missing chunks, would take that expert for a lost one).
  spec = dict(zarr_spec(location, layer, name), store_data_equal_to_fill_value=True, metadata={
      'shape': shape, 'data_type': 'bfloat16' if dtype.name == 'bfloat16' else dtype.name,
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': [1, *shape[1:]]}},
      # No compression, so a chunk file is exactly one expert's array, then its CRC-32C (layout.CODECS).
      'codecs': [dict(c) for c in layout.CODECS],
      'fill_value': 0,
  })
  return ts.open(spec, create=True, context=context).result()


def experts_per_block(cfg: Config, block_bytes: int) -> int:
  if block_bytes <= 0:
    raise ConfigError(f'--block-mib: must be > 0, got {block_bytes} bytes')
  return max(1, min(cfg.moe.experts_total, block_bytes // layout.expert_bytes(cfg)))


@functools.lru_cache(maxsize=4)   # one compile per (config, block size) per process
def random_block_fn(cfg: Config, n: int) -> Callable[[int, int, int], dict[str, np.ndarray]]:
  """f(seed, layer, start) -> {name: [n, ...]}: experts start..start+n-1 of `layer`, each drawn from its
  own key fold_in(fold_in(fold_in(key(seed), layer), array), expert), uniform with variance 1/fan_in
  like litejax.model.layers.param. An expert's weights depend only on (seed, layer, array, expert id), not on
  the block size. One compile for all blocks."""
  import jax
  import jax.numpy as jnp

  from litejax.model.layers import DTYPES
  shapes, dtype = layout.expert_shapes(cfg), DTYPES[cfg.model.param_dtype]

  @jax.jit
  def block(seed, layer, start):
    base = jax.random.fold_in(jax.random.key(seed), layer)
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
      bound = (3.0 / shape[0]) ** 0.5     # fan_in: d for w_in/w_gate, h for w_out
      keys = jax.vmap(lambda e, k=jax.random.fold_in(base, i): jax.random.fold_in(k, e))(start + jnp.arange(n))
      out[name] = jax.vmap(lambda k, s=shape: jax.random.uniform(k, s, dtype, -bound, bound))(keys)
    return out

  return lambda seed, layer, start: {k: np.asarray(v) for k, v in block(seed, layer, start).items()}


def write_random(location: str, cfg: Config, seed: int, *, overwrite: bool = False,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, context: ts.Context | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ExpertStore:
  """Writes randomly initialised experts of every MoE layer, block by block; the next block is generated
  while the previous one is written."""
  n = experts_per_block(cfg, block_bytes)
  writer = StoreWriter(location, cfg, overwrite=overwrite, context=context)
  try:
    make = random_block_fn(cfg, n)
    e = cfg.moe.experts_total
    pending: list[ts.Future] = []
    done = 0
    for layer in layout.moe_layers(cfg):
      for start in range(0, e, n):
        block = make(seed, layer, start)
        writer.wait(pending)
        count = min(n, e - start)
        pending = writer.write_async(layer, start, {k: v[:count] for k, v in block.items()})
        done += count
        if progress:
          progress(done, e * len(layout.moe_layers(cfg)))
    writer.wait(pending)
  except BaseException:
    writer.close()
    raise
  return writer.finish({'kind': 'init', 'seed': int(seed)})
