"""Expert-parallel dispatch under `jax.shard_map`: pack -> all_to_all -> local experts -> all_to_all -> combine.

Every (data, expert) rank routes its own N_loc = local_batch·seq_len tokens (routing happens before,
in MoEBlock). Experts are split over the `expert` axis in contiguous blocks: expert e lives on expert
rank e // E_loc (E_loc = E / R_EP), so the experts of a routing group share a rank.

Capacity is per (source rank, expert): C = max(ceil(capacity_factor · N_loc · K / E), min_capacity),
with the same slot-major priority as single-device dispatch (`dispatch.assignment_positions`), so
with one expert rank and N_loc = N the drops are exactly those of `dispatch.moe_ffn`.

Paths (`moe.dispatch`, resolved for N_loc; `einsum` runs as `capacity`):
  capacity: each source rank fills an [E, C, d] buffer = [R_EP, E_loc·C, d]; row r goes to rank r.
            The receiver sees [E_loc, R_EP·C, d] and runs batched expert matmuls. Nothing but
            activations travels: an expert's slots are implied by position.
  gather:   for E ≫ capacity_factor·N·K an [E, C, d] buffer would be mostly empty, so assignments
            kept by the per-expert capacity are packed per destination rank into
            C_rank = min(E_loc·C, N_loc·K, ceil(capacity_factor·N_loc·K / R_EP)) slots (a second bound:
            an assignment past it is dropped too) with their local expert id (int32); the receiver
            gathers each slot's expert weights, so compute follows assignments.
Rank-aligned groups (`moe.rank_aligned_groups`, groups T·G divisible by R_EP): the unit sent is a
(token, chosen group) visit, not an assignment. Capacity is per (source rank, group):
C_g = max(ceil(capacity_factor · N_loc · k_tier·k_group / (T·G)), min_capacity), and the gather path
packs per rank as above with k_tier·k_group in place of K. Each visit carries the k_expert local
expert ids (int32) and combine weights (f32); the receiving rank applies those k_expert experts and
returns their weighted sum, so each all-to-all moves ∝ k_tier·k_group rows per token instead of ∝ K.

All buffers have static shapes; empty slots carry zeros and are never read back.

`moe_ffn` picks the dispatch from the ambient mesh (`jax.set_mesh`): none or one device runs
`dispatch.moe_ffn` locally; otherwise this module's shard_map runs on the mesh's axes as
`litejax.sharding` names them. The buffer plan is `litejax.ep_plan`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from litejax import dispatch, sharding
from litejax.config import MoEConfig
from litejax.dispatch import assignment_positions, combine, drop_fractions, expert_ffn, pack_rows, unpack_rows
from litejax.ep_plan import Plan, plan
from litejax.routing import Routing


def _slots(bucket_ni: jax.Array, p: Plan):
  """Slot of each item in the send buffer (dummy = total_slots when dropped) and its keep mask."""
  pos, keep = assignment_positions(bucket_ni, p.bucket_capacity)
  if p.path == 'capacity':
    slot = bucket_ni * p.bucket_capacity + pos
  else:
    dest = bucket_ni // (p.num_buckets // p.num_ranks)
    rpos, _ = assignment_positions(jnp.where(keep, dest, p.num_ranks), p.slots_per_rank)
    keep = keep & (rpos < p.slots_per_rank)
    slot = dest * p.slots_per_rank + rpos
  return jnp.where(keep, slot, p.total_slots).astype(jnp.int32), keep


def _scatter_rows(values: jax.Array, slot_ni: jax.Array, total: int) -> jax.Array:
  """[n, i, ...] per-item metadata (expert ids, weights) -> [total, ...] slot values (empty slots zero)."""
  tail = values.shape[2:]
  out = jnp.zeros((total + 1,) + tail, values.dtype)
  return out.at[slot_ni.reshape(-1)].set(values.reshape((-1,) + tail))[:total]


def ep_dispatch(x_nd: jax.Array, expert_nk: jax.Array, weight_nk: jax.Array, w: dict[str, jax.Array],
                cfg: MoEConfig, p: Plan, expert_axis: str, tensor_axis: str | None):
  """The per-rank body (inside shard_map). Returns (y [N_loc, d], keep [N_loc, K]).

  w holds this rank's E_loc experts (and its tensor shard of their hidden units, when
  `tensor_axis` is set: partial outputs are summed over it).
  """
  n, d = x_nd.shape
  R, kind = p.num_ranks, cfg.expert_kind
  e_loc = w['w_in'].shape[0]
  k_e = cfg.k_expert

  def a2a(t):
    return t if R == 1 else jax.lax.all_to_all(t, expert_axis, 0, 0, tiled=True)

  def reduce_tensor(t):
    return t if tensor_axis is None else jax.lax.psum(t, tensor_axis)

  if p.aligned:
    visits = p.items_per_token
    bucket = expert_nk.reshape(n, visits, k_e)[:, :, 0] // cfg.experts_per_group   # global group
  else:
    bucket = expert_nk
  slot, keep = _slots(bucket, p)
  m = p.total_slots                                           # rows received = rows sent
  x_recv = a2a(pack_rows(x_nd, slot, m).reshape(R, p.slots_per_rank, d))

  if p.aligned:
    eid = _scatter_rows((expert_nk % e_loc).reshape(n, visits, k_e), slot, m)
    wt = _scatter_rows(weight_nk.reshape(n, visits, k_e).astype(jnp.float32), slot, m)
    eid, wt = a2a(eid.reshape(R, -1, k_e)), a2a(wt.reshape(R, -1, k_e))
    w_mk = {name: v[eid.reshape(m, k_e)] for name, v in w.items()}        # [M, k_e, d, h]
    y_mkd = expert_ffn(x_recv.reshape(m, d), w_mk, kind, 'md,mkdh->mkh', 'mkh,mkhd->mkd')
    y_recv = combine(y_mkd, wt.reshape(m, k_e))
  elif p.path == 'capacity':
    cap = p.bucket_capacity
    x_ecd = x_recv.reshape(R, e_loc, cap, d).transpose(1, 0, 2, 3).reshape(e_loc, R * cap, d)
    y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
    y_recv = y_ecd.reshape(e_loc, R, cap, d).transpose(1, 0, 2, 3)
  else:
    eid = a2a(_scatter_rows(expert_nk % e_loc, slot, m).reshape(R, -1))
    w_m = {name: v[eid.reshape(m)] for name, v in w.items()}             # [M, d, h]
    y_recv = expert_ffn(x_recv.reshape(m, d), w_m, kind, 'md,mdh->mh', 'mh,mhd->md')

  y_back = a2a(reduce_tensor(y_recv).reshape(R, p.slots_per_rank, d))
  y_items = unpack_rows(y_back.reshape(m, d), slot)           # [N, items, d]; dropped -> zero row
  if p.aligned:
    y_nd = y_items.sum(axis=1)                                # weights were applied on arrival
    keep = jnp.repeat(keep, k_e, axis=1)
  else:
    y_nd = combine(y_items, weight_nk * keep)
  return y_nd, keep


def moe_ffn(x_nd: jax.Array, r: Routing, w: dict[str, jax.Array], cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
  """Runs the routed experts with the dispatch the ambient mesh calls for. Returns (y [N, d], drop_fraction [3]).

  No mesh (or one device): `dispatch.moe_ffn` on this device. A litejax mesh (`jax.set_mesh`) of
  more devices: `ep_dispatch` under shard_map; tokens enter split over `sharding.BATCH_AXES` (each
  rank keeps its own N_loc), expert weights split over 'expert' and 'tensor'; the output has the
  tokens' sharding and drop fractions are averaged over the batch ranks.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return dispatch.moe_ffn(x_nd, r, w, cfg)
  missing = [a for a in sharding.AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'expert-parallel dispatch: the ambient mesh has axes {mesh.axis_names}, '
                     f'missing {missing} (build it with litejax.sharding.make_mesh)')
  sizes = {a: int(mesh.shape[a]) for a in sharding.AXES}
  sharding.validate_moe_mesh(cfg, sizes)
  batch_axes = sharding.BATCH_AXES
  batch_ranks = math.prod(sizes[a] for a in batch_axes)
  n_global = x_nd.shape[0]
  if n_global % batch_ranks:
    raise ValueError(f'{n_global} tokens do not split over {batch_ranks} data*expert ranks')
  p = plan(cfg, n_global // batch_ranks, sizes['expert'])
  tokens = P(batch_axes, None)
  w_specs = {name: sharding.logical_to_spec(('expert', 'expert_mlp', 'embed') if name == 'w_out'
                                            else ('expert', 'embed', 'expert_mlp')) for name in w}

  def body(x, e_nk, w_nk, w_loc):
    # Weights are split over tensor (even of size 1), so outputs are psum-ed over it to be replicated.
    y, keep = ep_dispatch(x, e_nk, w_nk, w_loc, cfg, p, 'expert', 'tensor')
    return y, jax.lax.pmean(drop_fractions(keep, cfg), batch_axes)

  return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_specs),
                       out_specs=(tokens, P()))(x_nd, r.expert_nk, r.weight_nk, w)
