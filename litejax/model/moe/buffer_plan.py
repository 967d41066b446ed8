"""Expert-parallel buffer plan: the static shapes of one expert-parallel MoE call, and the
all-to-all bytes they imply (pure Python; shared by `litejax.model.moe.expert_parallel`, which dispatches with
them, and the analytic volume in `litejax.analysis.core` / `litejax.analysis.bound`). `BufferPlan`, not `Plan`:
it is no `litejax plan`.
"""
from __future__ import annotations

import dataclasses
import math

from litejax.config import MoEConfig
from litejax.model.moe.capacity import capacity, resolve_dispatch


@dataclasses.dataclass(frozen=True)
class BufferPlan:
  """Static shape plan of one expert-parallel MoE call on one source rank."""
  path: str                # 'capacity' or 'gather'
  aligned: bool            # rank-aligned groups: one visit per chosen group
  num_buckets: int         # E (experts) or T·G (groups, aligned)
  items_per_token: int     # K, or k_tier·k_group when aligned
  bucket_capacity: int     # C per (source rank, bucket)
  slots_per_rank: int      # rows sent to each destination rank per all-to-all
  num_ranks: int           # R_EP

  @property
  def total_slots(self) -> int:
    return self.num_ranks * self.slots_per_rank


def plan(cfg: MoEConfig, n_local: int, num_ranks: int) -> BufferPlan:
  """Buffer sizes for N_loc tokens on one source rank with R_EP expert ranks (see litejax.model.moe.expert_parallel)."""
  E = cfg.experts_total
  path = resolve_dispatch(cfg, n_local, E)
  path = 'capacity' if path == 'einsum' else path
  if cfg.rank_aligned_groups:
    buckets, items = cfg.num_tiers * cfg.groups_per_tier, cfg.k_tier * cfg.k_group
    cap = max(math.ceil(cfg.capacity_factor * n_local * items / buckets - 1e-9), cfg.min_capacity)
  else:
    buckets, items = E, cfg.k_active
    cap = capacity(cfg, n_local, E)
  per_rank_buckets = buckets // num_ranks
  if path == 'dropless':   # decode: every item fits (capacity and slots per rank = N_loc·items)
    return BufferPlan('gather', cfg.rank_aligned_groups, buckets, items, n_local * items, n_local * items, num_ranks)
  if path == 'capacity':
    spr = per_rank_buckets * cap
  else:
    spr = min(per_rank_buckets * cap, n_local * items,
              max(math.ceil(cfg.capacity_factor * n_local * items / num_ranks - 1e-9), 1))
  return BufferPlan(path, cfg.rank_aligned_groups, buckets, items, cap, spr, num_ranks)


def all_to_all_bytes(p: BufferPlan, d: int, act_bytes: int, k_expert: int) -> dict[str, int]:
  """Bytes one rank puts into the all-to-alls of one MoE forward call, by buffer.

  'dispatch' and 'combine' are the activation buffers (each R_EP·slots·d); 'metadata' the int32
  expert ids (gather path) or ids + f32 weights (rank-aligned). Buffer sizes, including the block a
  rank keeps for itself (1/R_EP of it), which is how XLA shapes the all-to-all.
  """
  rows = p.total_slots
  act = rows * d * act_bytes
  if p.aligned:
    meta = rows * k_expert * (4 + 4)
  elif p.path == 'gather':
    meta = rows * 4
  else:
    meta = 0
  if p.num_ranks == 1:       # no all-to-all is emitted
    return {'dispatch': 0, 'combine': 0, 'metadata': 0, 'total': 0}
  return {'dispatch': act, 'combine': act, 'metadata': meta, 'total': 2 * act + meta}


def analytic_all_to_all_bytes_per_rank(cfg, global_tokens: int, mesh_shape, dtype_bytes: int) -> dict[str, int]:
  """Per-rank bytes of the all-to-alls of ONE MoE layer's forward pass, exactly as dispatched.

  cfg: a Config (or MoEConfig with d_model given via cfg.model). mesh_shape: (data, expert, tensor)
  or a dict with those keys. N_loc = global_tokens / (data · expert). Returns
    'dispatch' — the tokens sent out: ≈ capacity_factor · N_loc · K · d · bytes (capacity path:
                 exactly E · C · d · bytes with C = capacity(N_loc)), i.e. capacity_factor·N·K·d·bytes/R_EP
                 when data = 1; with rank-aligned groups K becomes k_tier·k_group;
    'combine'  — the results returned (same size), 'metadata' — int32 expert ids / f32 weights that
                 the gather path and rank-aligned groups send with the tokens, 'router' — the expert
                 level of the router scored on the groups' owners (`router_all_to_all_bytes`), and 'total'.
  A training step's backward pass moves the same again (the transpose of an all-to-all is one).
  R_EP = 1 sends nothing. Buffers include the 1/R_EP block a rank keeps for itself.
  """
  if isinstance(mesh_shape, dict):
    data, expert = mesh_shape['data'], mesh_shape['expert']
  else:
    data, expert = mesh_shape[0], mesh_shape[1]
  ranks = data * expert
  if global_tokens % ranks:
    raise ValueError(f'{global_tokens} tokens do not split over data*expert = {ranks} ranks')
  p = plan(cfg.moe, global_tokens // ranks, expert)
  out = all_to_all_bytes(p, cfg.model.d_model, dtype_bytes, cfg.moe.k_expert)
  out['router'] = router_all_to_all_bytes(cfg.moe, global_tokens // ranks, expert, cfg.model.d_model)
  out['total'] += out['router']
  return out


def router_slots_per_rank(cfg: MoEConfig, n_local: int, num_ranks: int) -> int:
  """Rows one source rank sends each expert rank to score the expert level on the group's owner
  (`litejax.model.moe.router_parallel`): its N_loc·k_tier·k_group (token, kept group) visits spread over the
  R_EP owners, so ceil(capacity_factor · N_loc·kept / R_EP), never more than N_loc·kept (then nothing
  can drop); N_loc·kept when dispatch resolves to dropless (decode: nothing drops)."""
  kept = cfg.k_tier * cfg.k_group
  visits = n_local * kept
  if resolve_dispatch(cfg, n_local, cfg.experts_total) == 'dropless':
    return visits
  # A factor below 1 would drop visits of perfectly balanced routing: floored at 1.
  return min(visits, max(math.ceil(max(cfg.capacity_factor, 1.0) * visits / num_ranks - 1e-9), 1))


def router_all_to_all_bytes(cfg: MoEConfig, n_local: int, num_ranks: int, d: int) -> int:
  """Bytes one rank puts into the router's all-to-alls of one MoE forward call (litejax.model.moe.router_parallel),
  0 where router_expert is not split by group: R_EP·C rows of f32 activations and an int32 group id out,
  R_EP·C rows of E_g f32 logits back. A backward moves the activations and logits again (not the ids)."""
  from litejax.sharding import router_expert_split
  if not router_expert_split(cfg, num_ranks):
    return 0
  rows = num_ranks * router_slots_per_rank(cfg, n_local, num_ranks)
  return rows * (d * 4 + 4 + cfg.experts_per_group * 4)
