"""Communication accounting: collective bytes per rank read from compiled, optimized HLO, and the
analytic all-to-all volume of expert-parallel dispatch.

`collective_bytes` reads `compiled.as_text()` (after SPMD partitioning, so shapes are per-device),
parsed by litejax.hlo:
  bytes per instruction = the per-rank buffer of the collective:
    all-to-all, all-reduce, collective-permute: the result (= operand) size, summed over tuple parts;
    all-gather: the gathered result;  reduce-scatter: the result × group size (= the operand).
  Async pairs are counted once, at `-start` (all-gather-start: its output half of the tuple;
  collective-permute-start: its first array). A collective whose replica groups have one member moves
  nothing and counts 0.
  Multiplicity: `litejax.hlo.Module.multiplicities`, whose one trip-count rule every HLO reader in
  litejax shares (known_trip_count, else the loop condition's constant, else once and listed under
  'unknown_trip_count'). Both branches of a conditional are counted (an upper bound).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from litejax import hlo
from litejax.config import MoEConfig, capacity, resolve_dispatch

KINDS = ('all_to_all', 'all_gather', 'reduce_scatter', 'all_reduce', 'collective_permute')
_OPS = {
    'all-to-all': 'all_to_all', 'ragged-all-to-all': 'all_to_all',
    'all-gather': 'all_gather', 'all-gather-start': 'all_gather',
    'reduce-scatter': 'reduce_scatter',
    'all-reduce': 'all_reduce', 'all-reduce-start': 'all_reduce',
    'collective-permute': 'collective_permute', 'collective-permute-start': 'collective_permute',
}


def _group_size(attrs: str) -> int | None:
  m = re.search(r'replica_groups=\{(\{[^}]*\})', attrs)
  if m:
    return len([x for x in m.group(1).strip('{}').split(',') if x.strip()])
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    names = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes[n]) for n in names)
  return None                                   # all devices / unknown: assume it moves data


def _moved_bytes(ins: hlo.Instr) -> float:
  """Bytes one rank's buffer of a collective instruction holds (see the module docstring)."""
  parts = [math.prod(d) * hlo.dtype_bytes(t) for t, d in ins.shapes]
  if ins.opcode == 'all-gather-start':
    parts = parts[len(parts) // 2:]
  elif ins.opcode == 'collective-permute-start':
    parts = parts[:1]
  nbytes = sum(parts)
  if ins.opcode == 'reduce-scatter':
    nbytes *= _group_size(ins.attrs) or 1
  return nbytes


def _module(compiled_or_hlo: Any) -> hlo.Module:
  if isinstance(compiled_or_hlo, hlo.Module):
    return compiled_or_hlo
  text = compiled_or_hlo if isinstance(compiled_or_hlo, str) else compiled_or_hlo.as_text()
  return hlo.parse(text)


def collective_bytes(compiled_or_hlo: Any) -> dict[str, Any]:
  """Bytes per rank moved by collectives in one execution, by kind, plus 'total'.

  Accepts a compiled executable (anything with `.as_text()`), its HLO text or a parsed
  litejax.hlo.Module. Also returns 'count' (instructions × executions per kind) and
  'unknown_trip_count' (loops counted once).
  """
  module = _module(compiled_or_hlo)
  out: dict[str, Any] = {k: 0 for k in KINDS}
  count = {k: 0 for k in KINDS}
  for name, times in module.multiplicities().items():
    for ins in module[name].instrs.values():
      kind = _OPS.get(ins.opcode)
      if kind is None or _group_size(ins.attrs) == 1:
        continue
      out[kind] += _moved_bytes(ins) * times
      count[kind] += times
  out['total'] = sum(out[k] for k in KINDS)
  out['count'] = count
  out['unknown_trip_count'] = module.unknown_loops()
  return out


def upcast_bytes(compiled_or_hlo: Any) -> dict[str, float]:
  """Bytes of the all-to-alls that are there only because XLA:CPU moves bf16 operands as f32 (an
  operand widened by a convert just before the collective: 2 of its 4 bytes per element)."""
  from litejax.hlo_artefacts import widened_from
  module = _module(compiled_or_hlo)
  total = 0.0
  for name, times in module.multiplicities().items():
    comp = module[name]
    for ins in comp.instrs.values():
      if _OPS.get(ins.opcode) != 'all_to_all' or _group_size(ins.attrs) == 1:
        continue
      for o in ins.operands:
        narrow = widened_from(module, comp, o) if o in comp.instrs else None
        if narrow:
          src = comp.instrs[o]
          total += times * (src.nbytes - src.elements * hlo.dtype_bytes(narrow))
  return {'all_to_all': total} if total else {}


# Expert-parallel buffer plan (pure Python, shared by the dispatch and the analytic volume).

@dataclasses.dataclass(frozen=True)
class Plan:
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


def plan(cfg: MoEConfig, n_local: int, num_ranks: int) -> Plan:
  """Buffer sizes for N_loc tokens on one source rank with R_EP expert ranks (see module doc)."""
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
    return Plan('gather', cfg.rank_aligned_groups, buckets, items, n_local * items, n_local * items, num_ranks)
  if path == 'capacity':
    spr = per_rank_buckets * cap
  else:
    spr = min(per_rank_buckets * cap, n_local * items,
              max(math.ceil(cfg.capacity_factor * n_local * items / num_ranks - 1e-9), 1))
  return Plan(path, cfg.rank_aligned_groups, buckets, items, cap, spr, num_ranks)


def all_to_all_bytes(p: Plan, d: int, act_bytes: int, k_expert: int) -> dict[str, int]:
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
                 the gather path and rank-aligned groups send with the tokens, and 'total'.
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
  return all_to_all_bytes(p, cfg.model.d_model, dtype_bytes, cfg.moe.k_expert)
