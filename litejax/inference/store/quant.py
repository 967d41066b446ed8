"""The int8 fallback copy of an expert (the HOBBIT idea, arXiv 2411.01433): kept resident, used on a miss
instead of stalling while the full-precision expert is fetched for later tokens.

Symmetric per-row quantisation along the last axis: for each row r of w [..., c],
scale_r = max|w_r| / 127 and q = round(w / scale_r) in [-127, 127], so |w - q * scale_r| <= scale_r / 2
elementwise (up to float rounding). A row of zeros gets scale 1 and quantises to zeros exactly.
"""
from __future__ import annotations

import numpy as np


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(q int8 [..., c], scale f32 [..., 1]) with w ~= q * scale."""
  w32 = np.asarray(w, np.float32)
  amax = np.max(np.abs(w32), axis=-1, keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w32 / scale), -127, 127).astype(np.int8)
  return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
  return (q.astype(np.float32) * scale).astype(dtype)


def quantize_experts(experts: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Quantises every array of a block of experts ({name: [n, rows, c]}), each row its own scale."""
  return {name: quantize_int8(w) for name, w in experts.items()}


def int8_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
  """Bytes of one expert's int8 copy: one byte per weight plus one f32 scale per row."""
  total = 0
  for shape in shapes.values():
    rows = int(np.prod(shape[:-1]))
    total += rows * shape[-1] + 4 * rows
  return total


def int8_copies(store, block: int = 1024) -> dict[int, dict[str, tuple]]:
  """The resident int8 copy of every expert (miss='fallback'): per layer {name: (q int8 [E, ...] , scale
  f32 [E, rows, 1])} on the default device, quantised per row by `quantize_int8`. store: an ExpertStore;
  a damaged chunk raises its ChunkDamagedError (copies are made from intact reads only)."""
  import jax
  out = {}
  for layer in store.layers:
    parts: dict[str, list] = {name: [] for name in store.shapes}
    for start in range(0, store.num_experts, block):
      got = store.read_experts(layer, range(start, min(start + block, store.num_experts)))
      for name, w in got.items():
        parts[name].append(quantize_int8(w))
    out[layer] = {name: tuple(jax.device_put(np.concatenate([p[i] for p in ps])) for i in range(2))
                  for name, ps in parts.items()}
  return out
