"""Which model weight a dot reads: its operands traced back to an entry parameter of the module.

XLA:CPU drops the metadata of matrix-vector dots (one token per device, as in a decode step): the
q projection and a shared expert's w_in then have the same shape signature ([1, d] · [d, d]) and
their neighbours name no scope, so neither `hlo_scopes.by_signature` nor `near_scope` can tell
them apart. The weight they read can: entry parameters keep their pytree path as op_name
(`params['periods']['layers'][0]['attn']['w_q'].value`). An operand is followed upward through
data movement only (bitcast, copy, transpose, reshape, convert, slices, a gather's table, fusions
of those),
into a fusion's or while body's parameter and back out to its caller's operand (through tuples and
get-tuple-element), until an entry parameter is reached; any arithmetic on the way means the operand
is an activation, not a weight.
"""
from __future__ import annotations

import re

from litejax.hlo.parse import Computation, Instr, Module

_MOVES = frozenset('bitcast copy transpose reshape convert dynamic-slice slice gather broadcast '
                   'copy-start copy-done'.split())
_SLICES = frozenset(('dynamic-slice', 'slice', 'gather'))
_MAX_DEPTH = 48
# pytree path fragment -> component (litejax.model.bounds.COMPONENTS); routed vs dense FFN is decided apart.
_FAMILIES = (("['attn']", 'attention_proj'), ("['shared']", 'shared_experts'),
             ("['router_tier']", 'router_tier'), ("['router_group']", 'router_group'),
             ("['router_expert']", 'router_expert'), ("['unembed']", 'unembed'), ("['embed']", 'unembed'))
_FFN_WEIGHT = re.compile(r"\['ffn'\]\['w_(in|gate|out)'\]")


class WeightOrigins:
  """Entry-parameter paths of dot operands in one parsed module (callers indexed once)."""

  def __init__(self, module: Module):
    self.module = module
    self.callers: dict[str, list[tuple[Computation, Instr]]] = {}
    for comp in module.computations.values():
      for ins in comp.instrs.values():
        for callee, _ in module.callees(ins):
          self.callers.setdefault(callee, []).append((comp, ins))
    entry = module[module.entry]
    self._moves = _MOVES
    self.entry_paths = [unescape(i.op_name) for i in entry.instrs.values() if i.opcode == 'parameter']

  def origin(self, comp: Computation, name: str, through_slices: bool = True) -> str | None:
    """The op_name (pytree path) of the entry parameter that `name` in `comp` is a moved copy of
    (through_slices=False: a copy of the whole parameter, not of a slice or gathered rows of it)."""
    self._moves = _MOVES if through_slices else _MOVES - _SLICES
    return self._trace(comp, name, [], [], 0)

  def _trace(self, comp: Computation, name: str, tuple_idx: list[int], calls: list, depth: int) -> str | None:
    ins = comp.instrs.get(name)
    if ins is None or depth > _MAX_DEPTH:
      return None
    moves = self._moves
    op, nxt = ins.opcode, depth + 1
    if op == 'parameter':
      return self._from_parameter(comp, ins, tuple_idx, calls, nxt)
    if op == 'get-tuple-element':
      return self._trace(comp, ins.operands[0], tuple_idx + [int(ins.attr('index') or 0)], calls, nxt)
    if op == 'tuple':
      if not tuple_idx or tuple_idx[-1] >= len(ins.operands):
        return None
      return self._trace(comp, ins.operands[tuple_idx[-1]], tuple_idx[:-1], calls, nxt)
    if op in moves and ins.operands:
      return self._trace(comp, ins.operands[0], tuple_idx, calls, nxt)
    if op == 'fusion' and ins.called('calls'):   # followed from its root: arithmetic stops the trace
      body = self.module.get(ins.called('calls')[0])
      if body is not None:
        return self._trace(body, body.root, tuple_idx, calls + [(comp, ins)], nxt)
    return None

  def _from_parameter(self, comp, ins, tuple_idx, calls, depth) -> str | None:
    if comp.is_entry:
      return ins.op_name if not tuple_idx else None
    if calls:                                    # a fusion we descended into: its caller's operand
      caller_comp, caller = calls[-1]
      if ins.param_index >= len(caller.operands):
        return None
      return self._trace(caller_comp, caller.operands[ins.param_index], tuple_idx, calls[:-1], depth)
    callers = self.callers.get(comp.name, [])
    if len(callers) != 1:                        # called from several places: no single origin
      return None
    caller_comp, caller = callers[0]
    if caller.opcode == 'while':                 # body parameter = the loop's carried tuple
      return self._trace(caller_comp, caller.operands[0], tuple_idx, [], depth)
    if ins.param_index >= len(caller.operands):
      return None
    return self._trace(caller_comp, caller.operands[ins.param_index], tuple_idx, [], depth)

  def component(self, comp: Computation, ins: Instr, components: tuple[str, ...]) -> str | None:
    """The component of a dot from the weight it reads (rhs first), or None when neither operand is
    a weight of a known family."""
    for o in reversed(ins.operands[:2]):
      path = self.origin(comp, o)
      c = component_of_weight(unescape(path), self.entry_paths) if path else None
      if c in components:
        return c
    return None


def unescape(op_name: str) -> str:
  return op_name.replace("\\'", "'")   # the HLO text escapes the path's quotes: [\'attn\']


def component_of_weight(path: str, entry_paths: list[str] = ()) -> str | None:
  """Component of a parameter path: attention, shared expert, router level, unembedding, or an FFN
  weight (routed 'experts' when its block has a router, else 'dense_ffn')."""
  m = _FFN_WEIGHT.search(path)
  if m:
    block = path[:m.start()] + "['ffn']"
    routed = any(p.startswith(block) and "['router_expert']" in p for p in entry_paths)
    return 'experts' if routed else 'dense_ffn'
  for fragment, comp in _FAMILIES:
    if fragment in path:
      return comp
  return None
