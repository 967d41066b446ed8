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

import math
import re
from collections import defaultdict
from typing import Any

# The expert-parallel buffer plan moved to litejax.ep_plan; re-exported for callers not yet updated.
from litejax.ep_plan import Plan, all_to_all_bytes, analytic_all_to_all_bytes_per_rank, plan  # noqa: F401

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
