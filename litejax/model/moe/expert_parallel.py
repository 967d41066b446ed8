"""Expert-parallel dispatch under `jax.shard_map`: pack -> all_to_all -> local experts -> all_to_all -> combine.

Every (data, expert) rank routes its own N_loc = local_batch·seq_len tokens (routing happens before,
in MoEBlock). Experts are split over the `expert` axis in contiguous blocks: expert e lives on expert
rank e // E_loc (E_loc = E / R_EP), so the experts of a routing group share a rank.

Capacity is per (source rank, expert): C = max(ceil(capacity_factor · N_loc · K / E), min_capacity),
with the same slot-major priority as single-device dispatch (`rows.assignment_positions`), so
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
`litejax.sharding` names them. The buffer plan is `litejax.model.moe.buffer_plan`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from litejax.model.moe import dispatch
from litejax import sharding
from litejax.model.moe import row_grad as sparse_grad
from litejax.config import MoEConfig
from litejax.model.moe.rows import assignment_positions, combine, drop_fractions, expert_ffn, pack_rows, unpack_rows
from litejax.model.moe.buffer_plan import BufferPlan, plan
from litejax.model.moe.routing import Routing


def _slots(bucket_ni: jax.Array, p: BufferPlan):
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


def _touched(eid_plus: jax.Array, e_loc: int, w: dict[str, jax.Array], deltas: dict[str, jax.Array]):
  """Sparse training: the local experts that arriving slots name (eid_plus = local id + 1, 0 = empty
  slot). Returns (rows {name: [u, ...]} = w[ids_u] + delta, differentiable in the deltas only;
  slot of each arriving slot in rows (u = empty slot, zero activations); ids_u int32 [u], padded with e_loc)."""
  u = next(iter(deltas.values())).shape[0]
  ids = jnp.where(eid_plus > 0, eid_plus - 1, e_loc)
  ids_u, slot = sparse_grad.unique_ids(ids.reshape(-1), u, e_loc)
  rows = {name: sparse_grad.touched_rows(v, ids_u, deltas[name]) for name, v in w.items()}
  return rows, slot.reshape(eid_plus.shape), ids_u


def _received_experts(bucket_ni: jax.Array, keep_ni: jax.Array, p: BufferPlan, e_loc: int, a2a) -> jax.Array:
  """Capacity path, sparse training: ids [E_loc] of the local experts that receive any assignment
  (the rest padded with E_loc). Each source sends one int per expert: O(E), which this path's
  regime (E < auto_gather_ratio·N·K) bounds by O(N·K)."""
  sent_e = jnp.zeros((p.num_buckets,), jnp.int32).at[bucket_ni.reshape(-1)].max(keep_ni.reshape(-1).astype(jnp.int32))
  got = a2a(sent_e.reshape(p.num_ranks, e_loc)).max(axis=0)
  return jnp.where(got > 0, jnp.arange(e_loc, dtype=jnp.int32), e_loc)


def ep_dispatch(x_nd: jax.Array, expert_nk: jax.Array, weight_nk: jax.Array, w: dict[str, jax.Array],
                cfg: MoEConfig, p: BufferPlan, expert_axis: str, tensor_axis: str | None,
                deltas: dict[str, jax.Array] | None = None):
  """The per-rank body (inside shard_map). Returns (y [N_loc, d], keep [N_loc, K]).

  w holds this rank's E_loc experts (and its tensor shard of their hidden units, when
  `tensor_axis` is set: partial outputs are summed over it).
  deltas (sparse training): zero perturbations {name: [u, ...]} of the touched local experts' rows;
  the experts then run on w[ids_u] + delta and the result is (y, keep, ids_u int32 [u] local ids,
  padded with E_loc). u: E_loc on the capacity path, else min(E_loc, arriving assignments).
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
    sparse = deltas is not None   # ids sent + 1 so that an empty slot (0) names no expert
    eid = _scatter_rows((expert_nk % e_loc + sparse).reshape(n, visits, k_e), slot, m)
    wt = _scatter_rows(weight_nk.reshape(n, visits, k_e).astype(jnp.float32), slot, m)
    eid, wt = a2a(eid.reshape(R, -1, k_e)), a2a(wt.reshape(R, -1, k_e))
    if sparse:
      rows, slot_mk, ids_u = _touched(eid.reshape(m, k_e), e_loc, w, deltas)
      w_mk = {name: sparse_grad.slot_rows(v, slot_mk) for name, v in rows.items()}
    else:
      w_mk = {name: v[eid.reshape(m, k_e)] for name, v in w.items()}      # [M, k_e, d, h]
    y_mkd = expert_ffn(x_recv.reshape(m, d), w_mk, kind, 'md,mkdh->mkh', 'mkh,mkhd->mkd')
    y_recv = combine(y_mkd, wt.reshape(m, k_e))
  elif p.path == 'capacity':
    cap = p.bucket_capacity
    x_ecd = x_recv.reshape(R, e_loc, cap, d).transpose(1, 0, 2, 3).reshape(e_loc, R * cap, d)
    if deltas is not None:   # an expert that receives nothing runs on zero rows: its slots are empty
      ids_u = _received_experts(bucket, keep, p, e_loc, a2a)
      w = {name: sparse_grad.touched_rows(v, ids_u, deltas[name]) for name, v in w.items()}
    y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
    y_recv = y_ecd.reshape(e_loc, R, cap, d).transpose(1, 0, 2, 3)
  else:
    sparse = deltas is not None   # ids sent + 1 so that an empty slot (0) names no expert
    eid = a2a(_scatter_rows(expert_nk % e_loc + sparse, slot, m).reshape(R, -1))
    if sparse:
      rows, slot_m, ids_u = _touched(eid.reshape(m), e_loc, w, deltas)
      w_m = {name: sparse_grad.slot_rows(v, slot_m) for name, v in rows.items()}
    else:
      w_m = {name: v[eid.reshape(m)] for name, v in w.items()}           # [M, d, h]
    y_recv = expert_ffn(x_recv.reshape(m, d), w_m, kind, 'md,mdh->mh', 'mh,mhd->md')

  y_back = a2a(reduce_tensor(y_recv).reshape(R, p.slots_per_rank, d))
  y_items = unpack_rows(y_back.reshape(m, d), slot)           # [N, items, d]; dropped -> zero row
  if p.aligned:
    y_nd = y_items.sum(axis=1)                                # weights were applied on arrival
    keep = jnp.repeat(keep, k_e, axis=1)
  else:
    y_nd = combine(y_items, weight_nk * keep)
  return (y_nd, keep) if deltas is None else (y_nd, keep, ids_u)


def _mesh_plan(x_nd: jax.Array, cfg: MoEConfig):
  """(mesh, plan) of an expert-parallel call under the ambient mesh, or (None, None) for local dispatch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None, None
  missing = [a for a in sharding.AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'expert-parallel dispatch: the ambient mesh has axes {mesh.axis_names}, '
                     f'missing {missing} (build it with litejax.sharding.make_mesh)')
  sizes = {a: int(mesh.shape[a]) for a in sharding.AXES}
  sharding.validate_moe_mesh(cfg, sizes)
  batch_ranks = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  n_global = x_nd.shape[0]
  if n_global % batch_ranks:
    raise ValueError(f'{n_global} tokens do not split over {batch_ranks} data*expert ranks')
  return mesh, plan(cfg, n_global // batch_ranks, sizes['expert'])


def _weight_axes(name: str) -> tuple[str, str, str]:
  return ('expert', 'expert_mlp', 'embed') if name == 'w_out' else ('expert', 'embed', 'expert_mlp')


def moe_ffn(x_nd: jax.Array, r: Routing, w: dict[str, jax.Array], cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
  """Runs the routed experts with the dispatch the ambient mesh calls for. Returns (y [N, d], drop_fraction [3]).

  No mesh (or one device): `dispatch.moe_ffn` on this device. A litejax mesh (`jax.set_mesh`) of
  more devices: `ep_dispatch` under shard_map; tokens enter split over `sharding.BATCH_AXES` (each
  rank keeps its own N_loc), expert weights split over 'expert' and 'tensor'; the output has the
  tokens' sharding and drop fractions are averaged over the batch ranks.
  """
  mesh, p = _mesh_plan(x_nd, cfg)
  if mesh is None:
    return dispatch.moe_ffn(x_nd, r, w, cfg)
  batch_axes = sharding.BATCH_AXES
  tokens = P(batch_axes, None)
  w_specs = {name: sharding.logical_to_spec(_weight_axes(name)) for name in w}

  def body(x, e_nk, w_nk, w_loc):
    # Weights are split over tensor (even of size 1), so outputs are psum-ed over it to be replicated.
    y, keep = ep_dispatch(x, e_nk, w_nk, w_loc, cfg, p, 'expert', 'tensor')
    return y, jax.lax.pmean(drop_fractions(keep, cfg), batch_axes)

  return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_specs),
                       out_specs=(tokens, P()))(x_nd, r.expert_nk, r.weight_nk, w)


def touched_rows_per_rank(cfg: MoEConfig, n_local: int, num_ranks: int) -> int:
  """u: the static bound on the experts one rank's MoE call touches (sparse training).

  Local dispatch (num_ranks 0): min(E, N·K). Expert parallel: the rank's E_loc experts on the capacity
  path (its buffer holds every local expert), else min(E_loc, assignments arriving at the rank).
  """
  E = cfg.experts_total
  if num_ranks == 0:
    return sparse_grad.touched_bound(E, n_local * cfg.k_active)
  p = plan(cfg, n_local, num_ranks)
  e_loc = E // num_ranks
  if p.path == 'capacity' and not p.aligned:
    return e_loc
  arriving = p.total_slots * (cfg.k_expert if p.aligned else 1)
  return sparse_grad.touched_bound(e_loc, arriving)


def moe_ffn_touched(x_nd: jax.Array, r: Routing, w: dict[str, jax.Array], deltas: dict[str, jax.Array],
                    cfg: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`moe_ffn` for sparse training: the experts run on their touched rows w[ids] + delta only.

  deltas: zero perturbations {name: [rows, ...]} (`litejax.model.moe.row_grad`), differentiated by the train
  step; rows = u locally, R_b·u on a mesh (each of the R_b = data·expert ranks its own u touched local
  experts, `touched_rows_per_rank`), split over the batch axes like tokens.
  Returns (y [N, d], drop_fraction [3], ids int32 [rows]): the global expert id of each delta row,
  padded with E; a row's gradient belongs to that expert (ids repeat across data ranks).
  """
  E = cfg.experts_total
  mesh, p = _mesh_plan(x_nd, cfg)
  if mesh is None:
    n, k = r.expert_nk.shape
    u = next(iter(deltas.values())).shape[0]
    ids_u, slot = sparse_grad.unique_ids(r.expert_nk.reshape(-1), u, E)
    rows = {name: sparse_grad.touched_rows(v, ids_u, deltas[name]) for name, v in w.items()}
    r_rows = dataclasses.replace(r, expert_nk=slot.reshape(n, k))   # a row of `rows` per assignment
    y, drop = dispatch.moe_ffn(x_nd, r_rows, rows, cfg, num_experts=E)
    return y, drop, ids_u
  batch_axes = sharding.BATCH_AXES
  tokens = P(batch_axes, None)
  w_specs = {name: sharding.logical_to_spec(_weight_axes(name)) for name in w}
  d_specs = {name: sharding.logical_to_spec(('batch',) + _weight_axes(name)[1:]) for name in w}
  e_loc = E // p.num_ranks

  def body(x, e_nk, w_nk, w_loc, d_loc):
    y, keep, ids_u = ep_dispatch(x, e_nk, w_nk, w_loc, cfg, p, 'expert', 'tensor', d_loc)
    ids_u = jnp.where(ids_u < e_loc, ids_u + jax.lax.axis_index('expert') * e_loc, E)
    return y, jax.lax.pmean(drop_fractions(keep, cfg), batch_axes), ids_u

  return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_specs, d_specs),
                       out_specs=(tokens, P(), P(batch_axes)))(x_nd, r.expert_nk, r.weight_nk, w, deltas)
