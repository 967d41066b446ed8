"""Capacity-bounded dispatch of routed assignments to experts, and the expert FFNs.

Capacity. N is the number of tokens routed together in one MoE call on one device (expert-parallel:
on one source rank): local_batch · seq_len. Each expert takes at most
C = max(ceil(capacity_factor · N · K / E), min_capacity) assignments. Priority is slot-major: every
token's first assignment is placed before any token's second, and within a slot tokens go in order.
An assignment past its expert's capacity is dropped: it contributes zero and the residual stream
carries the token.

Paths (same outputs on the same routing when nothing is dropped; the same drops everywhere):
  capacity: stable sort by expert -> position in expert -> gather tokens into an [E, C, d] buffer ->
            batched expert matmuls -> gather back and combine. Work E·C rows; no N×E×C tensor.
  gather:   compute follows assignments: each of the N·K assignments gathers its expert's weights.
            Work N·K rows whatever E is (dropped ones are masked, so shapes stay static).
  einsum:   GShard-style one-hot [N, E, C] dispatch/combine einsums; a reference baseline only.
  dropless: no capacity: sort by expert, grouped matmul (litejax.model.moe.dropless). Decoding always uses it.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from litejax.config import MoEConfig
from litejax.model.moe.capacity import capacity, resolve_dispatch
from litejax.model.moe.dropless import dropless_moe
from litejax.model.moe.routing import Routing
from litejax.model.moe.rows import (assignment_positions, combine, drop_fractions, expert_ffn, gather_ffn,
                                    pack_rows, unpack_rows)


def _capacity_path(x_nd, expert_nk, pos_nk, keep_nk, w, kind, num_experts, cap):
  d = x_nd.shape[-1]
  total = num_experts * cap
  slot_nk = jnp.where(keep_nk, expert_nk * cap + pos_nk, total)
  x_ecd = pack_rows(x_nd, slot_nk, total).reshape(num_experts, cap, d)
  y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  with jax.named_scope('dispatch'):
    return unpack_rows(y_ecd.reshape(total, d), slot_nk)     # [N, K, d]


def _einsum_path(x_nd, expert_nk, pos_nk, keep_nk, weight_nk, w, kind, num_experts, cap):
  with jax.named_scope('dispatch'):
    onehot_nke = jax.nn.one_hot(expert_nk, num_experts, dtype=x_nd.dtype)
    onehot_nkc = jax.nn.one_hot(pos_nk, cap, dtype=x_nd.dtype) * keep_nk[..., None].astype(x_nd.dtype)
    dispatch_nec = jnp.einsum('nke,nkc->nec', onehot_nke, onehot_nkc)
    combine_nec = jnp.einsum('nke,nkc,nk->nec', onehot_nke, onehot_nkc, weight_nk.astype(x_nd.dtype))
    x_ecd = jnp.einsum('nec,nd->ecd', dispatch_nec, x_nd)
  y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  with jax.named_scope('dispatch'):
    return jnp.einsum('nec,ecd->nd', combine_nec, y_ecd)


def moe_ffn(x_nd: jax.Array, routing: Routing, w: dict[str, jax.Array], cfg: MoEConfig,
            dispatch: str | None = None, num_experts: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the routed experts for N tokens on one device. Returns (y [N, d], drop_fraction [3]).

  w: 'w_in' [E, d, h], 'w_out' [E, h, d] and for glu 'w_gate' [E, d, h]. drop_fraction is per
  level (tier, group, expert), see `drop_fractions`. The path is `config.resolve_dispatch`'s.
  num_experts: the layer's E when w holds only some rows of the tables (sparse training: the u
  touched experts, routing.expert_nk their row in w, in the order of their expert ids): the path and
  capacity follow E, the buffers the rows of w.
  """
  n = x_nd.shape[0]
  rows = w['w_in'].shape[0]
  num_experts = num_experts or rows
  if dispatch is not None:
    cfg = dataclasses.replace(cfg, dispatch=dispatch)
  path = resolve_dispatch(cfg, n, num_experts)
  if path == 'dropless':   # no capacity, nothing dropped (litejax.model.moe.dropless)
    return dropless_moe(x_nd, routing.expert_nk, routing.weight_nk, w, cfg.expert_kind), jnp.zeros((3,), jnp.float32)
  cap = capacity(cfg, n, num_experts)
  pos_nk, keep_nk = assignment_positions(routing.expert_nk, cap)
  with jax.named_scope('dispatch'):
    weight_nk = routing.weight_nk * keep_nk
  if path == 'capacity':
    y_nkd = _capacity_path(x_nd, routing.expert_nk, pos_nk, keep_nk, w, cfg.expert_kind, rows, cap)
    y_nd = combine(y_nkd, weight_nk)
  elif path == 'gather':
    y_nd = combine(gather_ffn(x_nd, routing.expert_nk, w, cfg.expert_kind), weight_nk)
  elif path == 'einsum':
    y_nd = _einsum_path(x_nd, routing.expert_nk, pos_nk, keep_nk, weight_nk, w, cfg.expert_kind, rows, cap)
  else:
    raise ValueError(f'moe.dispatch: unknown path {path!r}')
  return y_nd, drop_fractions(keep_nk, cfg)
