"""Bytes one execution of a program reads from the routed experts' weight tables, by cause: what a decode
step asks for (the active experts' rows) and what a backend adds (XLA:CPU's bf16 upcast of a scanned table).
Operands are traced to the table parameters by litejax.hlo.weights; reads follow litejax.hlo.flops' byte rule.
"""
from __future__ import annotations

from litejax.hlo.artefacts import NARROW_FLOATS
from litejax.hlo.flops import NO_BYTES, SLICING, slice_reads
from litejax.hlo.parse import parse
from litejax.hlo.weights import WeightOrigins, component_of_weight, unescape


def expert_table_reads(hlo_text: str) -> dict[str, float]:
  """Bytes one execution reads from the routed experts' weight tables (per device), split by cause.

  total   counted where a table is read directly (reached from its entry parameter without a slice):
          a slice or gather of it reads the slices (litejax.hlo.flops' rule, also for a fusion whose parameter
          is only sliced, through chains of slices: a scanned layer's dynamic-slice fused into the
          gather of K rows reads those rows); any other use (a copy, a convert of the whole table, a
          dense dot) reads it all. The gathered rows' later uses are activations' traffic.
  cpu_bf16_upcast  the part of `total` due to XLA:CPU's bf16 upcast of a scanned table: the CPU
          backend computes bf16 in f32, converts each stacked 16-bit expert table to f32 whole at entry
          (hoisted out of the layer loop; the loop then gathers the K rows from the f32 copy). The
          artefact: the entry convert's read of every expert, and the widening of the rows the loop
          reads (half of an f32 row read of a bf16 table). A TPU compile of the same step has no such
          convert (the tables stay bf16), and `total - cpu_bf16_upcast` is then the K rows' slices.
  """
  module = parse(hlo_text)
  origins = WeightOrigins(module)

  def table_path(comp, name, through_slices=False):
    path = origins.origin(comp, name, through_slices=through_slices)
    return bool(path) and component_of_weight(unescape(path), origins.entry_paths) == 'experts'

  upcasts = _entry_upcasts(module, table_path)
  total = upcast = 0.0
  for name, times in module.multiplicities(control_flow_only=True).items():
    comp = module[name]
    for ins in comp.instrs.values():
      if ins.opcode in NO_BYTES or not ins.operands:
        continue
      if ins.opcode in SLICING:
        if table_path(comp, ins.operands[0]):
          total += times * ins.nbytes
          upcast += times * ins.nbytes / 2 if _is_upcast_read(comp, ins.operands[0], upcasts) else 0.0
        continue
      called = module.get(ins.called('calls')[0]) if ins.opcode == 'fusion' and ins.called('calls') else None
      params = {i.param_index: i for i in called.instrs.values() if i.opcode == 'parameter'} if called else {}
      for idx, o in enumerate(ins.operands):
        if o not in comp.instrs or not table_path(comp, o):
          continue
        p = params.get(idx)
        sliced = slice_reads(called, p.name) if p is not None else None
        read = times * (comp.instrs[o].nbytes if sliced is None else sliced)
        total += read
        if comp.is_entry and ins.name in upcasts:
          upcast += read
        elif _is_upcast_read(comp, o, upcasts):
          upcast += read / 2                # f32 rows of a 16-bit table: half of it is the widening
  return {'total': total, 'cpu_bf16_upcast': upcast}


def _entry_upcasts(module, table_path) -> set[str]:
  """Entry instructions converting a whole 16-bit expert table parameter to f32 (a `convert`, or a
  fusion whose root is one)."""
  entry = module[module.entry]
  out = set()
  for ins in entry.instrs.values():
    root = ins
    if ins.opcode == 'fusion' and ins.called('calls') and ins.called('calls')[0] in module:
      called = module[ins.called('calls')[0]]
      root = called.instrs.get(called.root)
    if root is None or root.opcode != 'convert' or not ins.shapes or ins.shapes[0][0] != 'f32':
      continue
    src = entry.instrs.get(ins.operands[0]) if ins.operands else None
    if src is not None and src.opcode == 'parameter' and src.shapes[0][0] in NARROW_FLOATS \
        and table_path(entry, src.name):
      out.add(ins.name)
  return out


def _is_upcast_read(comp, name: str, upcasts: set[str]) -> bool:
  """Whether a read of `name` reads the f32 copy of an upcast table (its values are f32 while the
  module upcast some table: expert tables all share one dtype)."""
  ins = comp.instrs.get(name)
  return bool(upcasts) and ins is not None and bool(ins.shapes) and ins.shapes[0][0] == 'f32'
