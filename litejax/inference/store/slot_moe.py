"""The MoE layer computed from device slots (pure JAX): routed experts read from a static [slots, ...]
buffer through an expert->slot remap, with the arithmetic of the resident dropless path.

Exactness. The resident step runs `litejax.model.moe.dropless` on CPU in the form `dropless.cpu_impl(A, E)` picks.
  direct (t = 1: every decode step): each assignment gathers its expert's slices and the same
         `rows.gathered_weights_ffn` runs here on the slices gathered from the slots: the same
         values in the same [N, K, ...] shapes, so the same outputs bit for bit.
  tiles  (prefill): the same tiles are built from slot ids instead of expert ids, with t and the tile
         count still taken from E: an expert's assignments are the same rows in the same order (a stable
         sort by slot keeps the within-expert order, and expert <-> slot is one-to-one in a wave), only
         the tiles come in slot order. Each tile is an independent matmul, so every assignment's output
         is the resident one bit for bit.
Either way the combine over K runs on the same [N, K, d] values.

Waves. When a step's distinct experts outnumber the slots (prefill, large batches), the host runs
several waves, each loading at most `slots` experts; `expert_outputs` keeps the per-assignment outputs
of the active assignments (a select, exact) and the combine runs once at the end.

Fallback (HOBBIT). An assignment whose expert is not in a slot may instead read the resident int8
copy: slot ids >= num_slots index `fallback_f` (the int8 rows gathered for this step's missed experts),
dequantised as litejax.inference.store.quant does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from litejax.model.moe.capacity import dropless_tiles
from litejax.model.moe.rows import combine, expert_ffn, gathered_weights_ffn
from litejax.model.moe.dropless import cpu_impl, sort_by_expert, tile_rows


def _dequant(q: jax.Array, scale: jax.Array) -> jax.Array:
  return q.astype(jnp.float32) * scale


def tile_weights(slot_w: dict[str, jax.Array], int8_w: dict[str, tuple[jax.Array, jax.Array]] | None,
                 fallback_f: jax.Array | None, slot_t: jax.Array) -> dict[str, jax.Array]:
  """Weights of each tile's slot: slot_w[name][s] for s < slots, else the dequantised int8 copy of
  expert fallback_f[s - slots]."""
  num_slots = next(iter(slot_w.values())).shape[0]
  if int8_w is None:
    return {name: w[slot_t] for name, w in slot_w.items()}
  in_slot = slot_t < num_slots
  expert_t = fallback_f[jnp.clip(slot_t - num_slots, 0, fallback_f.shape[0] - 1)]
  out = {}
  for name, w in slot_w.items():
    q, scale = int8_w[name]
    fb = _dequant(q[expert_t], scale[expert_t]).astype(w.dtype)
    sel = in_slot.reshape((-1,) + (1,) * (w.ndim - 1))
    out[name] = jnp.where(sel, w[jnp.minimum(slot_t, num_slots - 1)], fb)
  return out


def expert_outputs(x_nd: jax.Array, slot_nk: jax.Array, slot_w: dict[str, jax.Array], kind: str,
                   num_experts: int, active_nk: jax.Array, acc_nkd: jax.Array,
                   int8_w=None, fallback_f=None) -> jax.Array:
  """[N, K, d]: expert outputs of the active assignments (slot `slot_nk`), acc_nkd elsewhere.

  Inactive assignments must still carry a valid slot (e.g. 0); their rows are computed and discarded.
  """
  n, k = slot_nk.shape
  if cpu_impl(n * k, num_experts) == 'direct':
    w_a = tile_weights(slot_w, int8_w, fallback_f, slot_nk.reshape(-1))
    y_nkd = gathered_weights_ffn(x_nd, {name: v.reshape((n, k) + v.shape[1:]) for name, v in w_a.items()}, kind)
  else:
    y_nkd = _tiled_outputs(x_nd, slot_nk, slot_w, kind, num_experts, int8_w, fallback_f)
  return jnp.where(active_nk[:, :, None], y_nkd, acc_nkd)


def _tiled_outputs(x_nd, slot_nk, slot_w, kind, num_experts, int8_w, fallback_f) -> jax.Array:
  """[N, K, d] through the resident tiles layout (litejax.model.moe.dropless._tiled_ffn) over slot ids."""
  n, k = slot_nk.shape
  d = x_nd.shape[-1]
  x_ad = jnp.repeat(x_nd, k, axis=0)                                   # row n·K + j: token n, slot j
  order, sorted_s, rank, run = sort_by_expert(slot_nk)
  a = x_ad.shape[0]
  tile, tiles = dropless_tiles(a, num_experts)     # the resident layout's tiles (E, not slots)
  rows = tiles * tile
  row_a = tile_rows(sorted_s, rank, run, tile)
  source = jnp.full((rows,), a, jnp.int32).at[row_a].set(jnp.arange(a, dtype=jnp.int32))
  x_pad = jnp.concatenate([x_ad[order], jnp.zeros((1, d), x_ad.dtype)])
  x_tcd = x_pad[source].reshape(tiles, tile, d)
  slot_t = jnp.zeros((tiles,), jnp.int32).at[row_a // tile].set(sorted_s)
  w_t = tile_weights(slot_w, int8_w, fallback_f, slot_t)
  y_tcd = expert_ffn(x_tcd, w_t, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  y_sorted = y_tcd.reshape(rows, d)[row_a]
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(n, k, d)


def combine_outputs(y_nkd: jax.Array, weight_nk: jax.Array) -> jax.Array:
  """The resident path's weighted combine over the K assignments: [N, d]."""
  return combine(y_nkd, weight_nk)
