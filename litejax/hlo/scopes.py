"""Which model component an HLO instruction belongs to: its `jax.named_scope`, or a guess from the
traced program's dots and from its neighbours when XLA dropped its metadata.

The model wraps its matmuls in scopes named after litejax.model.bounds.COMPONENTS; an instruction's
op_name metadata (`jit(f)/transpose(jvp(experts))/dot`) names the innermost one.
"""
from __future__ import annotations

import math
import re

from litejax.hlo.parse import Computation, Instr


def component_of(op_name: str, components: tuple[str, ...]) -> str | None:
  """The innermost component scope named in an op_name (e.g. 'jit(f)/transpose(jvp(experts))/dot')."""
  best, pos = None, -1
  for c in components:
    for m in re.finditer(rf'(?<![\w]){re.escape(c)}(?![\w])', op_name):
      if m.start() > pos:
        best, pos = c, m.start()
  return best


def nesting(op_name: str, components: tuple[str, ...]) -> int:
  """How many component scopes an op_name is inside (dispatch/.../experts -> 2)."""
  return sum(len(re.findall(rf'(?<![\w]){re.escape(c)}(?![\w])', op_name)) for c in components)


def _sub_jaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(x, 'eqns'):
        yield x
      elif hasattr(x, 'jaxpr') and hasattr(x.jaxpr, 'eqns'):
        yield x.jaxpr


def dot_signatures(jaxpr, components: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
  """(component, contraction size, batch size, output size) of every scoped dot_general in a traced
  program (nested jaxprs included; their name stacks are relative to the enclosing eqn)."""
  out = []

  def visit(jx, prefix: str):
    for eqn in jx.eqns:
      stack = prefix + '/' + str(eqn.source_info.name_stack)
      if eqn.primitive.name == 'dot_general':
        (lc, _), (lb, _) = eqn.params['dimension_numbers']
        shape = eqn.invars[0].aval.shape
        c = component_of(stack, components)
        if c:
          out.append((c, math.prod(shape[i] for i in lc), math.prod(shape[i] for i in lb),
                      math.prod(eqn.outvars[0].aval.shape)))
      for sub in _sub_jaxprs(eqn.params):
        visit(sub, stack)

  visit(jaxpr.jaxpr if hasattr(jaxpr, 'jaxpr') else jaxpr, '')
  return out


def by_signature(ins: Instr, comp: Computation, signatures, divisors: list[int]) -> str | None:
  """The component of a dot that lost its metadata, from the traced program's dot signatures.

  Matched to the traced dots with the same contraction size whose batch and output sizes are its
  own times a divisor of the device count (SPMD shards them): first with the batch size equal, then
  with batch-ness alone (XLA may fold a batch dim into the free dims). The batch size is what tells
  attention's QKᵀ (batch B·H) from a gathered expert matmul (batch N·K) when h = head_dim and
  d = seq_len. One component among the matches decides, else None.
  """
  if not signatures or ins.opcode != 'dot':
    return None
  lhs = comp.instrs.get(ins.operands[0])
  if lhs is None:
    return None
  c = math.prod(lhs.shapes[0][1][i] for i in ins.dims_attr('lhs_contracting_dims'))
  batch = math.prod(lhs.shapes[0][1][i] for i in ins.dims_attr('lhs_batch_dims'))
  out = ins.elements

  def same(a: int, b: int) -> bool:
    return any(a == b * r for r in divisors)

  for level in ('batch', 'batched', 'any'):
    found = {comp_ for comp_, sc, sb, so in signatures
             if same(sc, c) and same(so, out) and
             (same(sb, batch) if level == 'batch' else (sb > 1) == (batch > 1) if level == 'batched'
              else True)}
    if len(found) == 1:
      return found.pop()
    if found:
      return None
  return None


def near_scope(comp: Computation, start: str, components: tuple[str, ...], params, out_scope,
               down: bool = True, up: bool = True, max_depth: int = 4) -> str | None:
  """The component of the nearest neighbour that names one, consumers first at equal distance.

  XLA rewrites drop the metadata of some dots (batched dots, dots on gathered operands); their
  consumers (the softmax after QKᵀ, the transpose after AV) and producers (the gathered router
  weights) still carry it. A fused computation's parameters resolve to the caller's operands
  (`params`) and its root to the caller's consumers (`out_scope`).
  """
  frontier_down, frontier_up, seen = [start], [start], {start}
  for _ in range(max_depth):
    found: list[tuple[int, str, int]] = []   # (nesting, component, order: producers first)
    nxt_down, nxt_up = [], []
    if down:
      nxt_down = _scan_consumers(comp, frontier_down, seen, components, out_scope, found)
    if up:
      nxt_up = _scan_producers(comp, frontier_up, seen, components, params, found)
    if found:
      # The most nested scope wins (the expert matmuls inside the dispatch scope are 'experts');
      # at equal nesting, producers before consumers, in operand order (AV's lhs is the probs).
      best = max(n for n, _, _ in found)
      ties = sorted((order, c) for n, c, order in found if n == best)
      return ties[0][1]
    frontier_down, frontier_up = nxt_down, nxt_up
  return None


def _scan_consumers(comp, frontier, seen, components, out_scope, found) -> list[str]:
  nxt = []
  for n in frontier:
    if n == comp.root and out_scope:
      found.append((1, out_scope, 10_000))
    for u in comp.users.get(n, ()):
      if u in seen:
        continue
      seen.add(u)
      c = component_of(comp.instrs[u].op_name, components)
      if c:
        found.append((nesting(comp.instrs[u].op_name, components), c, 10_000 + len(found)))
      else:
        nxt.append(u)
  return nxt


def _scan_producers(comp, frontier, seen, components, params, found) -> list[str]:
  nxt = []
  for n in frontier:
    for o in comp.instrs[n].operands if n in comp.instrs else ():
      if o in seen or o not in comp.instrs:
        continue
      seen.add(o)
      src = comp.instrs[o]
      c = component_of(src.op_name, components)
      if c is None and src.opcode == 'parameter' and 0 <= src.param_index < len(params):
        c = params[src.param_index]
      if c:
        found.append((nesting(src.op_name, components) if src.op_name else 1, c, len(found)))
      else:
        nxt.append(o)
  return nxt
