"""Backend artefacts in optimized HLO: work a backend charges that the program did not ask for.

  gather table convert  an elementwise op (a bf16->f32 convert) whose values reach compute only as a
                        gather's table operand: charged over the whole table although only gathered
                        rows are touched (`feeds_only_gathers`, `gather_tables`).
  masked dense dot      a dot whose operand is select(mask, broadcast(x), 0), jax.lax.ragged_dot's
                        dense CPU lowering: the broadcast's expansion is wasted (`masked_expansion`).
  bf16 round trip       a convert pair f32->bf16->f32 (or bf16->f32->bf16): XLA:CPU computes bf16
                        ops in f32 and rounds after each (`is_round_trip`).
  narrow float convert  any other convert between bf16/f16 and a wider float (`is_narrow_float_convert`):
                        a cast, not arithmetic; XLA:CPU also inserts them around every bf16 op across
                        fusion boundaries, where `is_round_trip` cannot pair them. Reported, not useful
                        elementwise work (so the elementwise check compares like with like in f32 and bf16).
  widened collective    an f32 collective operand converted from bf16 just before it (`widened_from`).

Not an artefact but recognised here too: a dot lowered as elementwise work (`lowered_dot`). XLA rewrites
a dot_general with contraction size 1 (an outer product: the weight gradient of gathered slices,
one [d, h] product per assignment) as multiply(broadcast, broadcast), and small dots as
multiply + reduce; the ops keep the dot's op_name (`.../dot_general`), but for the TPU compiler's
multiply + reduce of a one-row dot only the reduce does (`untagged_dot_multiply`). litejax.hlo.flops
charges them as matmul work of their component.
"""
from __future__ import annotations

from litejax.hlo.parse import Computation, Instr, Module

_LAYOUT = ('bitcast', 'copy', 'transpose', 'reshape')
_PASS_THROUGH = _LAYOUT + ('convert', 'dynamic-slice', 'slice')
NARROW_FLOATS = ('bf16', 'f16')


def through_layout(comp: Computation, name: str) -> Instr | None:
  """Follows bitcast/copy/transpose/reshape back to the instruction that made the values."""
  ins = comp.instrs.get(name)
  while ins is not None and ins.opcode in _LAYOUT and ins.operands:
    ins = comp.instrs.get(ins.operands[0])
  return ins


def _fused_root(module: Module, ins: Instr) -> tuple[Computation | None, Instr | None]:
  called = module.get(ins.called('calls')[0]) if ins.called('calls') else None
  if called is None:
    return None, None
  return called, through_layout(called, called.root) if called.root else None


def masked_expansion(module: Module, comp: Computation, operand: str) -> float:
  """Expansion factor when `operand` is select(mask, broadcast(x), broadcast(0)) (else 1)."""
  ins = through_layout(comp, operand)
  if ins is not None and ins.opcode == 'fusion':
    comp, ins = _fused_root(module, ins)
    if comp is None:
      return 1.0
  if ins is None or ins.opcode != 'select' or len(ins.operands) != 3:
    return 1.0
  srcs = []
  for x in (comp.instrs.get(n) for n in ins.operands[1:]):
    if x is None or x.opcode != 'broadcast':
      return 1.0
    src = comp.instrs.get(x.operands[0])
    srcs.append(src.elements if src is not None else 1)
  if min(srcs) > 1:   # one branch must be a broadcast scalar (the zero fill)
    return 1.0
  return ins.elements / max(max(srcs), 1)


def widened_from(module: Module, comp: Computation, name: str, depth: int = 0) -> str | None:
  """The narrow float type (bf16/f16) an f32 value was widened from by a convert, through layout
  ops and into a producing fusion's root; None if it was not (the CPU backend computes bf16 in f32
  and widens collective operands it cannot move in bf16)."""
  ins = through_layout(comp, name)
  if ins is None or depth > 4:
    return None
  if ins.opcode == 'fusion' and ins.called('calls') and ins.called('calls')[0] in module:
    called = module[ins.called('calls')[0]]
    return widened_from(module, called, called.root, depth + 1)
  if ins.opcode == 'convert' and ins.operands and ins.shapes[0][0] == 'f32':
    src = comp.instrs.get(ins.operands[0])
    if src is not None and src.shapes and src.shapes[0][0] in NARROW_FLOATS:
      return src.shapes[0][0]
  return None


def is_narrow_float_convert(comp: Computation, ins: Instr) -> bool:
  """A convert from or to a narrow float (bf16/f16) from or to a wider float type."""
  if ins.opcode != 'convert' or not ins.operands or not ins.shapes:
    return False
  src = comp.instrs.get(ins.operands[0])
  if src is None or not src.shapes:
    return False
  t_out, t_in = ins.shapes[0][0], src.shapes[0][0]
  return (t_out in NARROW_FLOATS) != (t_in in NARROW_FLOATS) and {t_out, t_in} <= set(NARROW_FLOATS) | {'f32', 'f64'}


def is_round_trip(comp: Computation, ins: Instr) -> bool:
  """A convert that is half of a narrow->wide->narrow or wide->narrow->wide pair: the CPU backend's
  bf16 emulation (compute in f32, round to bf16 after each op the program wrote in bf16)."""
  if ins.opcode != 'convert' or not ins.operands:
    return False
  src = comp.instrs.get(ins.operands[0])
  if src is None or not src.shapes:
    return False
  t_out, t_in = ins.shapes[0][0], src.shapes[0][0]
  if src.opcode == 'convert' and src.operands:               # outer half: back to the source type
    s2 = comp.instrs.get(src.operands[0])
    if s2 is not None and s2.shapes and s2.shapes[0][0] == t_out and t_in in NARROW_FLOATS:
      return True
  us = [comp.instrs[u] for u in comp.users.get(ins.name, ()) if u in comp.instrs]
  return (t_out in NARROW_FLOATS and t_in not in NARROW_FLOATS and bool(us) and   # inner half
          all(u.opcode == 'convert' and u.shapes[0][0] == t_in for u in us))


def gather_tables(comp: Computation) -> set[str]:
  """Values of `comp` that only feed a gather's table operand, through layout ops and converts."""
  tables: set[str] = set()
  stack = [ins.operands[0] for ins in comp.instrs.values() if ins.opcode == 'gather' and ins.operands]
  while stack:
    n = stack.pop()
    src = comp.instrs.get(n)
    if n in tables or src is None:
      continue
    tables.add(n)
    if src.opcode in _LAYOUT + ('convert', 'dynamic-slice') and src.operands:
      stack.append(src.operands[0])
  return tables


def feeds_only_gathers(module: Module, comp: Computation, name: str, callers: tuple = (),
                       depth: int = 0) -> bool:
  """Whether the values of `name` reach compute only as a gather's table operand: through layout
  ops, converts and (dynamic) slices, into fusions, and across a while loop's carry (a scan's
  stacked expert weights, dynamic-sliced per layer, then gathered by expert id).

  callers: the (computation, fusion instruction name) chain a fused computation was entered by.
  """
  if depth > 16:
    return False
  us = comp.users.get(name, [])
  reached = False
  if name == comp.root and callers:             # leaves a fused computation: the caller's users
    if not feeds_only_gathers(module, *callers[-1], callers[:-1], depth + 1):
      return False
    reached = True
  for u_name in us:
    if not _use_feeds_only_gathers(module, comp, name, comp.instrs[u_name], callers, depth):
      return False
  return reached or bool(us)


def _use_feeds_only_gathers(module: Module, comp: Computation, name: str, u: Instr, callers: tuple,
                            depth: int) -> bool:
  if u.opcode == 'gather':
    return u.operands[0] == name
  if u.opcode in _PASS_THROUGH:
    return u.operands[0] == name and feeds_only_gathers(module, comp, u.name, callers, depth + 1)
  if u.opcode == 'fusion' and u.called('calls'):
    called = module[u.called('calls')[0]]
    idx = [i for i, o in enumerate(u.operands) if o == name]
    prms = [i for i in called.instrs.values() if i.opcode == 'parameter' and i.param_index in idx]
    return bool(prms) and all(feeds_only_gathers(module, called, q.name, callers + ((comp, u.name),), depth + 1)
                              for q in prms)
  if u.opcode == 'tuple':
    return _carry_feeds_only_gathers(module, comp, name, u, depth)
  return False


def _carry_feeds_only_gathers(module: Module, comp: Computation, name: str, tup: Instr, depth: int) -> bool:
  """A value packed into a while loop's carry: its element inside the body and after the loop."""
  loops = [comp.instrs[w] for w in comp.users.get(tup.name, [])]
  if not loops and tup.name == comp.root:
    return True                                   # a loop body's carry passed on unchanged
  idx = {i for i, o in enumerate(tup.operands) if o == name}
  for w in loops:
    if w.opcode != 'while' or not w.called('body'):
      return False
    body = module[w.called('body')[0]]
    outs = [(body, g.name) for g in body.instrs.values()
            if g.opcode == 'get-tuple-element' and g.operands and
            body.instrs.get(g.operands[0]) is not None and body.instrs[g.operands[0]].opcode == 'parameter'
            and int(g.attr('index') or -1) in idx]
    outs += [(comp, g) for g in comp.users.get(w.name, [])
             if int(comp.instrs[g].attr('index') or -1) in idx]
    if not all(feeds_only_gathers(module, c, g, (), depth + 1) for c, g in outs):
      return False
  return True


def is_lowered_dot(ins: Instr) -> bool:
  """A multiply or reduce that XLA made out of a dot_general (its op_name says so; a convert of a
  dot's output carries the dot's op_name too, and is no part of it)."""
  return ins.opcode in ('multiply', 'reduce') and ins.op_name.rsplit('/', 1)[-1] == 'dot_general'


def untagged_dot_multiply(comp: Computation, ins: Instr) -> Instr | None:
  """The lowered-dot reduce that a multiply not named as the dot's feeds (its only users), else None.
  The TPU compiler rewrites a dot of one row (a decode step's one token per device) as a
  `multiply_reduce_fusion` whose reduce keeps the dot's op_name while the multiply has none, or a
  name of its own (`.../multiply.24`): the multiply is that dot's."""
  if ins.opcode != 'multiply' or is_lowered_dot(ins):
    return None
  users = [comp.instrs[u] for u in comp.users.get(ins.name, ()) if u in comp.instrs]
  if users and all(u.opcode == 'reduce' and is_lowered_dot(u) for u in users):
    return users[0]
  return None


def lowered_dot(module: Module, comp: Computation, name: str, depth: int = 0) -> Instr | None:
  """The multiply of a dot lowered as an outer product that produced `name` (through layout ops,
  converts and into a producing fusion's root), else None. A scatter-add whose updates it is accumulates the
  products into the table: the contraction of the dot the multiply lowered."""
  ins = comp.instrs.get(name)
  while ins is not None and ins.opcode in _LAYOUT + ('convert',) and ins.operands:
    ins = comp.instrs.get(ins.operands[0])      # a bf16 round trip may sit between (XLA:CPU)
  if ins is None or depth > 4:
    return None
  if ins.opcode == 'fusion' and ins.called('calls') and ins.called('calls')[0] in module:
    called = module[ins.called('calls')[0]]
    return lowered_dot(module, called, called.root, depth + 1)
  return ins if ins.opcode == 'multiply' and is_lowered_dot(ins) else None


_COPIES = ('copy', 'convert', 'bitcast-convert')


def table_copies(module: Module, table_elements: list[int]) -> list[int]:
  """Which 16-bit tables the program copies whole: for each table (its per-device element count, in
  order), whether a copy / convert / bitcast-convert anywhere in the module produces a 16-bit array of
  that many elements (1 or 0). XLA:CPU emulates bf16 and does not scatter it in place, so the row
  update's scatter into a bf16 table (as its uint16 bits, litejax.model.moe.row_grad) works on a table-sized
  copy. Tables of equal size are matched one copy each, as far as such instructions go."""
  found: dict[int, int] = {}
  for comp in module.computations.values():
    for ins in comp.instrs.values():
      if ins.opcode in _COPIES and len(ins.shapes) == 1 and ins.shapes[0][0] in ('u16', 's16', 'bf16', 'f16'):
        found[ins.elements] = found.get(ins.elements, 0) + 1
  out = []
  for n in table_elements:
    out.append(1 if found.get(n, 0) > 0 else 0)
    if out[-1]:
      found[n] -= 1
  return out
