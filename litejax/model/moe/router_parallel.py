"""The expert level of the hierarchical router with `router_expert` sharded by group over expert ranks.

`router_expert` [T·G, d, E_g] is split over the `expert` mesh axis in contiguous blocks of
G_loc = T·G / R_EP groups, like the experts: group g's router row lives on expert rank g // G_loc, the
rank that holds group g's experts (`litejax.sharding`, logical axis 'expert_group'). Every (data, expert)
rank routes its own N_loc tokens; the expert level of a (token, kept group) visit is scored on the
group's owner, never by gathering the table:

  1. each source rank packs its N_loc·kept visits by owner into [R_EP, C, d] (C =
     `ep_plan.router_slots_per_rank`, capacity_factor · N_loc·kept / R_EP) with the local group id,
  2. all_to_all over 'expert' (the token rows go to their groups' owners),
  3. the owner scores each arriving visit against its own row: [R_EP·C, E_g] logits,
  4. all_to_all back; each visit reads its logits from its slot.

Cost per rank and MoE layer, against the replicated table: sent C·R_EP·(d + 1) activations and ids, and
C·R_EP·E_g f32 logits back (≈ capacity_factor · N_loc·kept·(d + E_g) values), instead of an all-reduce of
the table's gradient (T·G·d·E_g) every step. The alternative that all-gathers the tokens' x over the
expert axis and psums masked [N, kept, E_g] logits moves R_EP·N_loc·(d + kept·E_g) values and scores every
visit on every rank (R_EP× the router FLOPs) unless it compacts the local visits, which is this design.

Gradients: the owner differentiates its own rows (the table's in_spec is split over 'expert' and not
'data', so shard_map sums its cotangent over the data replicas only). Sparse training passes a zero
delta [R_b·u, d, E_g] split over the batch axes (`moe.MoEBlock.attach_row_deltas`): each (data, expert)
rank reads its u touched local rows through it and reports their global ids, as the experts do.

A visit past its owner's C slots is dropped: it gets zero logits (so uniform scores) and keep False; the
router gives its k_expert assignments weight 0 (a capacity drop, as dispatch drops assignments). Where
C = N_loc·kept (small N, dropless) nothing can drop and the result equals the replicated table's.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from litejax import sharding
from litejax.model.moe import row_grad as sparse_grad
from litejax.config import MoEConfig
from litejax.model.moe.rows import assignment_positions, pack_rows, unpack_rows
from litejax.model.moe.buffer_plan import router_slots_per_rank


def sharded_mesh(num_groups: int, num_tokens: int):
  """The ambient mesh when the expert level runs sharded (`router_expert` split by group), else None.

  Sharded when the mesh has more than one expert rank, they divide the T·G groups
  (`sharding.groups_shard`) and the data·expert ranks divide the tokens; otherwise the table is
  replicated (or left to XLA) and routing is local.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(a not in mesh.axis_names for a in sharding.AXES):
    return None
  sizes = {a: int(mesh.shape[a]) for a in sharding.AXES}
  if not sharding.groups_shard(num_groups, sizes['expert']):
    return None
  if num_tokens % math.prod(sizes[a] for a in sharding.BATCH_AXES):
    return None
  return mesh


def rows_per_rank(cfg: MoEConfig, n_local: int, num_ranks: int) -> int:
  """u: the static bound on the router_expert rows one (data, expert) rank touches (sparse training):
  min(G_loc, visits arriving at it)."""
  groups_local = cfg.num_tiers * cfg.groups_per_tier // num_ranks
  return sparse_grad.touched_bound(groups_local, num_ranks * router_slots_per_rank(cfg, n_local, num_ranks))


@jax.checkpoint
def gathered_logits(x_md: jax.Array, w_rdb: jax.Array, row_m: jax.Array) -> jax.Array:
  """x_md · w_rdb[row_m] per row: [M, B] logits, each row scored against its own gathered [d, B] matrix.

  Rematerialised: the backward gathers the [M, d, B] matrices again instead of the layer scan saving
  them (M·d·B per layer, larger than the table rows they come from)."""
  return jnp.einsum('md,mdb->mb', x_md, sparse_grad.slot_rows(w_rdb, row_m).astype(x_md.dtype))


def _owner_logits(x_nd, group_np, w_loc, delta_loc, cfg: MoEConfig, num_ranks: int):
  """The per-rank body: (logits [N_loc, kept, E_g] f32, keep [N_loc, kept], touched global ids or None)."""
  n, kept = group_np.shape
  g_loc = w_loc.shape[0]
  c = router_slots_per_rank(cfg, n, num_ranks)
  m = num_ranks * c

  def a2a(t):
    return jax.lax.all_to_all(t.reshape((num_ranks, c) + t.shape[1:]), 'expert', 0, 0, tiled=True).reshape(t.shape)

  pos, keep = assignment_positions(group_np // g_loc, c)
  slot = jnp.where(keep, (group_np // g_loc) * c + pos, m).astype(jnp.int32)
  x_recv = a2a(pack_rows(x_nd, slot, m))                                    # [M, d]
  # Local group id + 1 per slot (0: empty slot), built like the expert ids of expert_parallel.
  gid = jnp.zeros((m + 1,), jnp.int32).at[slot.reshape(-1)].set((group_np % g_loc + 1).reshape(-1))[:m]
  gid = a2a(gid)
  ids = jnp.where(gid > 0, gid - 1, g_loc)
  if delta_loc is None:
    rows, slot_m, touched = w_loc, ids, None                                # an empty slot's x is zero
  else:
    ids_u, slot_m = sparse_grad.unique_ids(ids, delta_loc.shape[0], g_loc)
    rows = sparse_grad.touched_rows(w_loc, ids_u, delta_loc)
    base = jax.lax.axis_index('expert') * g_loc
    touched = jnp.where(ids_u < g_loc, ids_u + base, g_loc * num_ranks)
  logits_mb = gathered_logits(x_recv, rows, slot_m)
  logits_npb = unpack_rows(a2a(logits_mb), slot)                            # dropped visits: zeros
  return logits_npb, keep, touched


def expert_logits(x_nd: jax.Array, w_pdb: jax.Array, group_np: jax.Array, cfg: MoEConfig, mesh,
                  delta_udb: jax.Array | None = None):
  """Expert-level logits [N, kept, E_g] of every (token, kept group) visit, scored on the group's owner.

  x_nd: [N, d] f32, split over the batch axes; w_pdb: router_expert [T·G, d, E_g] split over 'expert';
  group_np: int [N, kept] global group ids; delta_udb: sparse training's zero delta [R_b·u, d, E_g]
  split over the batch axes (`rows_per_rank`). Returns (logits, keep bool [N, kept], touched ids
  int32 [R_b·u] global, padded with T·G; None without a delta).
  """
  batch = P(sharding.BATCH_AXES)
  table = P('expert')
  num_ranks = int(mesh.shape['expert'])

  if delta_udb is None:
    def body(x, g, w):
      return _owner_logits(x, g, w, None, cfg, num_ranks)[:2]
    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, table),
                         out_specs=(batch, batch))(x_nd, group_np, w_pdb) + (None,)

  def body_rows(x, g, w, dl):
    return _owner_logits(x, g, w, dl, cfg, num_ranks)
  return jax.shard_map(body_rows, mesh=mesh, in_specs=(batch, batch, table, batch),
                       out_specs=(batch, batch, batch))(x_nd, group_np, w_pdb, delta_udb)
