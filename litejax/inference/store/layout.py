"""What an expert store holds, as pure functions: expert shapes, the manifest, the config digest, and
which checkpoint leaves hold the routed experts.

A store at LOCATION (a local path or a TensorStore kvstore URL such as memory:// or file:///...) is

  manifest.json                      written last: a store without it is incomplete
  export.lock                        held (flock) by the export writing it (local stores)
  experts/layer_<i>/w_in             zarr3 [E, d, h]   one chunk = one expert, no compression
  experts/layer_<i>/w_gate           zarr3 [E, d, h]   (glu experts only)
  experts/layer_<i>/w_out            zarr3 [E, h, d]

for every MoE layer i (0-based model layer index), in the model's param dtype. Each chunk is the expert's
array (the `bytes` codec) followed by its CRC-32C (the `crc32c` codec, CHECKSUM_BYTES): TensorStore checks
it on every read, so a damaged chunk is an error, never weights. Version 1 stores (before the checksums)
are refused with the command that re-exports them.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from litejax.config import Config

FORMAT = 'litejax-expert-store'
FORMAT_VERSION = 2
MANIFEST = 'manifest.json'
LOCK = 'export.lock'
# zarr3 codecs of every array: the raw little-endian array, then a CRC-32C of it (4 bytes) per chunk.
CODECS = ({'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'crc32c'})
CHECKSUM_BYTES = 4


class ExpertStoreError(ValueError):
  """A store is missing, incomplete, truncated, or does not match the config or its own manifest."""


class ChunkDamagedError(ExpertStoreError):
  """One expert's chunk of one array fails its read: missing, short, or its checksum differs."""

  def __init__(self, message: str, layer: int, array: str, expert: int):
    super().__init__(message)
    self.layer, self.array, self.expert = layer, array, expert


class StoreWriteError(ExpertStoreError):
  """Writing a store failed (e.g. the disk is full); it has no manifest, so nothing opens it as a store."""


def reexport_hint(location: str, source: dict[str, Any]) -> str:
  """The command that writes the store at `location` again, from what its manifest says it came from."""
  if source.get('kind') == 'checkpoint':
    step = f" --step {source['step']}" if 'step' in source else ''
    return f"litejax export-experts --ckpt-dir {source.get('ckpt_dir', 'D')}{step} --out {location} --overwrite"
  if source.get('kind') == 'init':
    return (f"litejax export-experts --init --config C --seed {source.get('seed', 0)} --out {location} "
            '--overwrite (C: the config it was written from)')
  return f'litejax export-experts ... --out {location} --overwrite'


def array_names(cfg: Config) -> tuple[str, ...]:
  """The arrays of one routed expert, in store order."""
  return ('w_in', 'w_gate', 'w_out') if cfg.moe.expert_kind == 'glu' else ('w_in', 'w_out')


def expert_shapes(cfg: Config) -> dict[str, tuple[int, int]]:
  """Per-expert shape of each array: w_in/w_gate [d, h], w_out [h, d] (as in litejax.model.moe.block.MoEBlock)."""
  d, h = cfg.model.d_model, cfg.moe.d_expert
  return {name: ((h, d) if name == 'w_out' else (d, h)) for name in array_names(cfg)}


def expert_bytes(cfg: Config) -> int:
  """Bytes of one expert, all its arrays, in the param dtype."""
  itemsize = np.dtype(param_dtype(cfg)).itemsize
  return sum(math.prod(s) for s in expert_shapes(cfg).values()) * itemsize


def param_dtype(cfg: Config) -> np.dtype:
  import ml_dtypes   # bfloat16 as a NumPy dtype (a JAX dependency)
  return np.dtype(ml_dtypes.bfloat16) if cfg.model.param_dtype == 'bfloat16' else np.dtype(np.float32)


def moe_layers(cfg: Config) -> list[int]:
  return [i for i in range(cfg.model.num_layers) if cfg.model.is_moe_layer(i)]


def architecture(cfg: Config) -> dict[str, Any]:
  """The config sections that decide the weights (model, moe); mesh and train do not. moe.pregate is left
  out when 0, so a store written before the field existed keeps its digest."""
  d = cfg.to_dict()
  moe = {k: v for k, v in d['moe'].items() if k != 'pregate' or v}
  return {'model': d['model'], 'moe': moe}


def config_digest(cfg: Config) -> str:
  return hashlib.sha256(json.dumps(architecture(cfg), sort_keys=True).encode()).hexdigest()


def array_path(layer: int, name: str) -> str:
  return f'experts/layer_{layer}/{name}'


def make_manifest(cfg: Config, source: dict[str, Any]) -> dict[str, Any]:
  """The JSON manifest of a store of `cfg`'s experts; `source` says where the weights came from."""
  return {
      'format': FORMAT, 'format_version': FORMAT_VERSION,
      'config_digest': config_digest(cfg), 'config': architecture(cfg),
      'layers': moe_layers(cfg), 'experts_per_layer': cfg.moe.experts_total,
      'experts_per_group': cfg.moe.experts_per_group,
      'dtype': str(param_dtype(cfg)), 'arrays': {k: list(v) for k, v in expert_shapes(cfg).items()},
      'expert_bytes': expert_bytes(cfg), 'source': source,
  }


def config_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
  """The first field ('moe.d_expert: 16 in the store, 32 in the config') where two architectures differ."""
  for section in ('model', 'moe'):
    a, b = stored.get(section, {}), current.get(section, {})
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        return f'{section}.{key}: {a.get(key)!r} in the store, {b.get(key)!r} in the config'
  return None


def expert_leaves(cfg: Config) -> list[tuple[int, str, str, int | None]]:
  """(model layer, array name, checkpoint leaf name, index along the leaf's leading 'layers' axis or None)
  for every routed-expert array of the model, as litejax.train.leaf_specs.leaf_specs names leaves.

  Unscanned: params/blocks/<i>/ffn/w_in [E, d, h]. Scanned: one stacked leaf per position j in a period,
  params/periods/layers/<j>/ffn/w_in [P, E, d, h]; model layer = p * moe_every + j.
  """
  m = cfg.model
  out = []
  for layer in moe_layers(cfg):
    for name in array_names(cfg):
      if m.scan_layers:
        period = max(m.moe_every, 1)
        out.append((layer, name, f'params/periods/layers/{layer % period}/ffn/{name}', layer // period))
      else:
        out.append((layer, name, f'params/blocks/{layer}/ffn/{name}', None))
  return out
