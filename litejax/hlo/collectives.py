"""Communication accounting: collective bytes per rank read from compiled, optimized HLO, and the
analytic all-to-all volume of expert-parallel dispatch.

`collective_bytes` reads `compiled.as_text()` (after SPMD partitioning, so shapes are per-device),
parsed by litejax.hlo.parse:
  bytes per instruction = the per-rank buffer of the collective:
    all-to-all, all-reduce, collective-permute: the result (= operand) size, summed over tuple parts;
    all-gather: the gathered result;  reduce-scatter: the result × group size (= the operand).
  Async pairs are counted once, at `-start` (all-gather-start: its output half of the tuple;
  collective-permute-start: its first array). A collective whose replica groups have one member moves
  nothing and counts 0.
  Multiplicity: `litejax.hlo.parse.Module.multiplicities`, whose one trip-count rule every HLO reader in
  litejax shares (known_trip_count, else the loop condition's constant, else once and listed under
  'unknown_trip_count'). Both branches of a conditional are counted (an upper bound).
"""
from __future__ import annotations

import math
import re
from typing import Any

from litejax import units
from litejax.hlo import parse as hlo

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
  parts = [math.prod(d) * units.dtype_bytes(t, default=4) for t, d in ins.shapes]
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
  litejax.hlo.parse.Module. Also returns 'count' (instructions × executions per kind) and
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
  from litejax.hlo.artefacts import widened_from
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
          total += times * (src.nbytes - src.elements * units.dtype_bytes(narrow))
  return {'all_to_all': total} if total else {}

