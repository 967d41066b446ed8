"""Communication accounting: collective bytes per rank read from compiled, optimized HLO, and the
analytic all-to-all volume of expert-parallel dispatch.

`collective_bytes` reads `compiled.as_text()` (after SPMD partitioning, so shapes are per-device):
  bytes per instruction = the per-rank buffer of the collective:
    all-to-all, all-reduce, collective-permute: the result (= operand) size, summed over tuple parts;
    all-gather: the gathered result;  reduce-scatter: the result × group size (= the operand).
  Async pairs are counted once, at `-start` (all-gather-start: its output half of the tuple;
  collective-permute-start: its first array). A collective whose replica groups have one member moves
  nothing and counts 0.
  Multiplicity: the entry computation runs once; a computation reached from a `while` (body or
  condition) runs trip-count times its caller, with the trip count taken from the loop's backend
  config `known_trip_count` (what XLA records for scans); failing that, from a condition comparing
  the induction variable against an integer constant (`compare(..., constant N), direction=LT`),
  assuming it starts at 0; failing that, once, and the loop is listed under 'unknown_trip_count'.
  Both branches of a conditional are counted (an upper bound).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

from litejax.config import MoEConfig, capacity, resolve_dispatch

KINDS = ('all_to_all', 'all_gather', 'reduce_scatter', 'all_reduce', 'collective_permute')
_OPS = {
    'all-to-all': 'all_to_all', 'ragged-all-to-all': 'all_to_all',
    'all-gather': 'all_gather', 'all-gather-start': 'all_gather',
    'reduce-scatter': 'reduce_scatter',
    'all-reduce': 'all_reduce', 'all-reduce-start': 'all_reduce',
    'collective-permute': 'collective_permute', 'collective-permute-start': 'collective_permute',
}
_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
    's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5,
}
_COMP_HEAD = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]\w*?)\[([\d,]*)\]')
_CALLEE = re.compile(r'\b(condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')


def _arrays(shape_text: str) -> list[int]:
  """Byte sizes of the arrays in a (possibly tuple) HLO shape string."""
  out = []
  for dtype, dims in _ARRAY.findall(re.sub(r'/\*.*?\*/', '', shape_text)):
    if dtype in _DTYPE_BYTES:
      n = math.prod(int(x) for x in dims.split(',') if x) if dims else 1
      out.append(int(n * _DTYPE_BYTES[dtype]))
  return out


def _group_size(rest: str) -> int | None:
  m = re.search(r'replica_groups=\{(\{[^}]*\})', rest)
  if m:
    return len([x for x in m.group(1).strip('{}').split(',') if x.strip()])
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    names = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes[n]) for n in names)
  return None                                   # all devices / unknown: assume it moves data


def _parse(text: str):
  """{computation: [(name, shape, opcode, rest)]}, the entry name."""
  comps: dict[str, list] = {}
  entry, current = None, None
  for line in text.splitlines():
    head = _COMP_HEAD.match(line)
    if head and not line.startswith(' '):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == '}':
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(m.groups())
  return comps, entry


def _trip_from_condition(instrs) -> int | None:
  consts = {}
  for name, shape, op, rest in instrs:
    if op == 'constant' and re.match(r'^s(32|64)\[\]', shape):
      v = re.match(r'\s*(-?\d+)\)', rest)
      if v:
        consts[name] = int(v.group(1))
  for name, shape, op, rest in instrs:
    if op == 'compare' and 'direction=LT' in rest:
      for operand in re.findall(r'%([\w.\-]+)', rest.split(')')[0]):
        if operand in consts:
          return consts[operand]
  return None


def collective_bytes(compiled_or_hlo_text: Any) -> dict[str, Any]:
  """Bytes per rank moved by collectives in one execution, by kind, plus 'total'.

  Accepts a compiled executable (anything with `.as_text()`) or its HLO text. Also returns
  'count' (instructions × executions per kind) and 'unknown_trip_count' (loops counted once).
  """
  text = compiled_or_hlo_text if isinstance(compiled_or_hlo_text, str) else compiled_or_hlo_text.as_text()
  comps, entry = _parse(text)
  if entry is None:
    raise ValueError('collective_bytes: no ENTRY computation in the HLO text')

  # Multiplicity of each computation: sum over call sites of caller multiplicity × trip count.
  edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
  unknown = []
  for comp, instrs in comps.items():
    for name, shape, op, rest in instrs:
      trip = 1
      if op == 'while':
        t = _TRIP.search(rest)
        cond = re.search(r'condition=%?([\w.\-]+)', rest)
        if t:
          trip = int(t.group(1))
        elif cond and (c := _trip_from_condition(comps.get(cond.group(1), []))) is not None:
          trip = c
        else:
          unknown.append(name)
      for key, callee in _CALLEE.findall(rest):
        edges[comp].append((callee, trip if key in ('body', 'condition') else 1))
      for group in _BRANCHES.findall(rest):
        for callee in re.findall(r'%?([\w.\-]+)', group):
          edges[comp].append((callee, 1))
  mult: dict[str, int] = defaultdict(int)

  def visit(comp: str, times: int, depth: int = 0):
    if depth > 64:
      raise ValueError('collective_bytes: call graph too deep (recursive HLO?)')
    mult[comp] += times
    for callee, trip in edges.get(comp, ()):
      if callee in comps:
        visit(callee, times * trip, depth + 1)

  visit(entry, 1)

  out: dict[str, Any] = {k: 0 for k in KINDS}
  count = {k: 0 for k in KINDS}
  for comp, instrs in comps.items():
    times = mult.get(comp, 0)
    if not times:
      continue
    for name, shape, op, rest in instrs:
      kind = _OPS.get(op)
      if kind is None:
        continue
      size = _group_size(rest)
      if size == 1:
        continue
      parts = _arrays(shape)
      if op == 'all-gather-start':
        parts = parts[len(parts) // 2:]
      elif op == 'collective-permute-start':
        parts = parts[:1]
      nbytes = sum(parts)
      if op == 'reduce-scatter':
        nbytes *= size or 1
      out[kind] += nbytes * times
      count[kind] += times
  out['total'] = sum(out[k] for k in KINDS)
  out['count'] = count
  out['unknown_trip_count'] = unknown
  return out


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
