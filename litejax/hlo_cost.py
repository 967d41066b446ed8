"""FLOPs by component, bytes accessed and collective bytes of one optimized HLO module, loops counted.

`compiled.cost_analysis()` on CPU counts a while (scan) body once, charges dense FLOPs for masked
dense lowerings, and charges converts fused into gathers over the whole table. This walker recomputes
the figures from the instructions themselves (parsed by litejax.hlo, loops counted by its one
trip-count rule) so each can be attributed and corrected:

  dot          2 · |out| · |contracting|                 (convolution: 2 · |out| · |kernel| / out_features)
  elementwise  |out| per arithmetic op, |in| per reduce, |updates| per combiner op of a scatter (a
               scatter-add is the weight gradient of a gather): XLA's HloCostAnalysis convention, so that on
               a program without while loops `total_flops` equals `cost_analysis()['flops']`
               (tests/test_cost.py checks it within 3%, forward and train step). Transcendental ops
               (exp, tanh, ...) are not FLOPs in that convention (XLA counts them apart) and are
               not counted here either.
  while        body × trip count (a scan over L layers counts L times)
  fusion/call  the called computation, with the caller's metadata as fallback attribution

Each FLOP goes to the component named by the innermost `jax.named_scope` in its op_name metadata
(litejax.hlo_scopes); anything else is 'other', never dropped. Backend artefacts (charged, not
computed usefully: litejax.hlo_artefacts) are reported under `artefacts`.
Bytes accessed: operands + outputs of every unfused instruction, an operand that is only sliced
counting as the slices read (as HloCostAnalysis does). Collectives: litejax.comm.collective_bytes on
the same parsed module; all-to-all operands widened from bf16 just for XLA:CPU are reported apart
(`collective_upcast_bytes`), so compiled all-to-all bytes compare with the analytic ones.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

from litejax import hlo_artefacts as art
from litejax.hlo import Computation, Instr, Module, parse
from litejax.hlo_scopes import by_signature, component_of, near_scope
from litejax.hlo_weights import WeightOrigins

ELEMENTWISE = frozenset(
    'add subtract multiply divide maximum minimum compare select negate abs convert and or xor not '
    'remainder clamp sign floor ceil round-nearest-afz round-nearest-even shift-left shift-right-logical '
    'shift-right-arithmetic is-finite popcnt real imag stochastic-convert'.split())
_NO_BYTES = frozenset('parameter constant tuple get-tuple-element bitcast while call conditional after-all '
                      'partition-id replica-id iota'.split())
_SLICING = ('dynamic-slice', 'gather', 'slice')


@dataclasses.dataclass
class HloCost:
  """Trip-count-aware figures of one compiled program (one device's SPMD program)."""
  flops: dict[str, float]              # component -> dot/conv FLOPs ('other' = dots outside any scope)
  elementwise: dict[str, float]        # component -> elementwise FLOPs (HloCostAnalysis convention)
  artefacts: dict[str, float]          # artefact kind -> FLOPs charged but not useful work
  bytes_accessed: float                # operands + outputs of unfused instructions
  collective_bytes: dict[str, float]   # kind (litejax.comm.KINDS) -> bytes this rank moves; 'total'
  unknown_trip_counts: int             # while loops whose trip count is unknown (counted once)
  collective_upcast_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  # kind -> bytes of those collectives that are only there because the CPU backend moves bf16
  # values as f32 (an operand widened by a convert just before the collective)

  @property
  def dot_flops(self) -> float:
    return sum(self.flops.values())

  @property
  def elementwise_flops(self) -> float:
    return sum(self.elementwise.values())

  @property
  def total_flops(self) -> float:
    """Everything XLA's cost model would charge, trip counts included (artefacts included)."""
    return self.dot_flops + self.elementwise_flops

  @property
  def useful_flops(self) -> float:
    return self.total_flops - sum(self.artefacts.values())


def dot_flops(ins: Instr, comp: Computation) -> float:
  """2 · |out| · |contracting| of a dot instruction."""
  lhs = comp.instrs.get(ins.operands[0])
  if lhs is None:
    return 0.0
  contracting = math.prod(lhs.shapes[0][1][i] for i in ins.dims_attr('lhs_contracting_dims'))
  return 2.0 * ins.elements * contracting


def conv_flops(ins: Instr, comp: Computation) -> float:
  """2 · |out| · |kernel| / out_features of a convolution instruction."""
  rhs = comp.instrs.get(ins.operands[1])
  labels = ins.attr('dim_labels') or ''
  m = re.match(r'[\w]+_([\w]+)->', labels)
  if rhs is None or not m:
    return 0.0
  kernel = rhs.shapes[0][1]
  out_features = kernel[m.group(1).index('o')]
  return 2.0 * ins.elements * math.prod(kernel) / max(out_features, 1)


def scatter_flops(module: Module, comp: Computation, ins: Instr) -> float:
  """|updates| × the elementwise ops of the combiner (a scatter-add: one add per update element), as
  HloCostAnalysis charges it; a scatter that overwrites (combiner returns its update) costs 0."""
  n = len(ins.operands) // 2            # scatter(operands..., indices, updates...)
  updates = [comp.instrs.get(o) for o in ins.operands[n + 1:]]
  combiner = module.get(ins.called('to_apply')[0]) if ins.called('to_apply') else None
  if combiner is None or not updates or any(u is None for u in updates):
    return 0.0
  per_element = sum(1 for i in combiner.instrs.values() if i.opcode in ELEMENTWISE)
  return float(updates[0].elements * per_element)


def instr_bytes_accessed(module: Module, comp: Computation, ins: Instr) -> float:
  """Output + operand bytes of an unfused instruction; an operand that is only sliced (a scan's
  stacked weights, a gathered table) counts as the slices read, as HloCostAnalysis does."""
  if ins.opcode in _SLICING:
    return 2.0 * ins.nbytes
  if ins.opcode == 'dynamic-update-slice':
    upd = comp.instrs.get(ins.operands[1]) if len(ins.operands) > 1 else None
    return 2.0 * (upd.nbytes if upd is not None else ins.nbytes)
  total = float(ins.nbytes)
  called = module.get(ins.called('calls')[0]) if ins.opcode == 'fusion' and ins.called('calls') else None
  params = {i.param_index: i for i in called.instrs.values() if i.opcode == 'parameter'} if called else {}
  for idx, o in enumerate(ins.operands):
    src = comp.instrs.get(o)
    if src is None:
      continue
    p = params.get(idx)
    if p is not None:
      us = [u for u in called.instrs.values() if p.name in u.operands]
      if us and all(u.opcode in _SLICING and u.operands[0] == p.name for u in us):
        total += sum(u.nbytes for u in us)
        continue
    total += src.nbytes
  return total


def bytes_accessed(module: Module) -> float:
  """Bytes accessed by one execution: every unfused instruction × the runs of its computation."""
  total = 0.0
  for name, times in module.multiplicities(control_flow_only=True).items():
    comp = module[name]
    total += times * sum(instr_bytes_accessed(module, comp, ins) for ins in comp.instrs.values()
                         if ins.opcode not in _NO_BYTES)
  return total


class FlopWalker:
  """Walks a module from its entry, charging dot and elementwise FLOPs to components (see module doc)."""

  def __init__(self, module: Module, components: tuple[str, ...], signatures=None, num_devices: int = 1):
    self.module, self.components, self.signatures = module, components, signatures
    self.divisors = [r for r in range(1, num_devices + 1) if num_devices % r == 0]
    self.flops: dict[str, float] = collections.defaultdict(float)
    self.elementwise: dict[str, float] = collections.defaultdict(float)
    self.artefacts: dict[str, float] = collections.defaultdict(float)
    self.weights = WeightOrigins(module)   # dots without metadata: the weight they read names them

  def visit(self, comp_name: str, mult: float, ctx: str | None, params: list = (),
            out_scope: str | None = None, param_factors: list = ()) -> None:
    """Charges one computation run `mult` times; ctx: the caller's component (fallback attribution);
    params / out_scope / param_factors: a fused computation's operand scopes, consumer scope and
    operands' masked-expansion factors."""
    comp = self.module[comp_name]
    tables = art.gather_tables(comp)
    for ins in comp.instrs.values():
      own = component_of(ins.op_name, self.components)
      scope = own or ctx
      op = ins.opcode
      if op == 'fusion':
        self._fusion(comp, ins, mult, own, scope, params, out_scope)
      elif op == 'while':
        for c, trips in self.module.callees(ins):
          self.visit(c, mult * trips, scope)
      elif op in ('call', 'async-start'):
        for c in ins.called('to_apply') + ins.called('calls'):
          self.visit(c, mult, scope)
      elif op == 'conditional':
        for c in (ins.called('branch_computations') + ins.called('true_computation') +
                  ins.called('false_computation')):
          self.visit(c, mult, scope)
      elif op in ('dot', 'convolution'):
        self._dot(comp, ins, mult, own, ctx, params, out_scope, param_factors)
      elif op in ELEMENTWISE:
        f = mult * ins.elements
        self.elementwise[scope or 'other'] += f
        if ins.name in tables:
          self.artefacts['gather_table_convert'] += f
        elif art.is_round_trip(comp, ins):
          self.artefacts['bf16_round_trip'] += f
      elif op in ('reduce', 'reduce-window'):
        src = comp.instrs.get(ins.operands[0]) if ins.operands else None
        self.elementwise[scope or 'other'] += mult * (src.elements if src is not None else ins.elements)
      elif op == 'scatter':
        self.elementwise[scope or 'other'] += mult * scatter_flops(self.module, comp, ins)

  def _fusion(self, comp: Computation, ins: Instr, mult: float, own, scope, params, out_scope) -> None:
    if art.feeds_only_gathers(self.module, comp, ins.name):
      # A whole-table elementwise pass (the CPU backend's bf16->f32 convert of expert weights,
      # even of all layers' stacked weights before a scan) feeding only gathers: charged over
      # the table, while only gathered rows are needed.
      before = sum(self.elementwise.values())
      for c in ins.called('calls'):
        self.visit(c, mult, scope, [None] * len(ins.operands), None)
      self.artefacts['gather_table_convert'] += sum(self.elementwise.values()) - before
      return
    operand_scopes = [self._scope_of_operand(comp, o, params, out_scope) for o in ins.operands]
    consumer = own or near_scope(comp, ins.name, self.components, params, out_scope, up=False)
    factors = [art.masked_expansion(self.module, comp, o) for o in ins.operands]
    for c in ins.called('calls'):
      self.visit(c, mult, scope, operand_scopes, consumer, factors)

  def _scope_of_operand(self, comp: Computation, o: str, params, out_scope) -> str | None:
    if o not in comp.instrs:
      return None
    return (component_of(comp.instrs[o].op_name, self.components) or
            near_scope(comp, o, self.components, params, out_scope, down=False))

  def _dot(self, comp: Computation, ins: Instr, mult: float, own, ctx, params, out_scope, param_factors) -> None:
    f = mult * (dot_flops(ins, comp) if ins.opcode == 'dot' else conv_flops(ins, comp))
    where = (own or self.weights.component(comp, ins, self.components) or
             by_signature(ins, comp, self.signatures, self.divisors) or
             near_scope(comp, ins.name, self.components, params, out_scope) or ctx or 'other')
    self.flops[where] += f
    if ins.opcode != 'dot':
      return
    factor = 1.0
    for o in ins.operands:
      src = comp.instrs.get(o)
      if src is not None and src.opcode == 'parameter' and 0 <= src.param_index < len(param_factors):
        factor = max(factor, param_factors[src.param_index])
      else:
        factor = max(factor, art.masked_expansion(self.module, comp, o))
    if factor > 1:
      self.artefacts['masked_dense_dot'] += f * (1 - 1 / factor)


def walk(text_or_module: str | Module, components: tuple[str, ...], signatures: list | None = None,
         num_devices: int = 1) -> HloCost:
  """The HloCost of an optimized HLO module (text or parsed); see the module docstring.

  signatures: `hlo_scopes.dot_signatures(jaxpr)` of the traced program, to attribute dots whose
  metadata XLA dropped (litejax.hlo_scopes.by_signature); num_devices: the SPMD device count.
  """
  from litejax import comm
  module = parse(text_or_module) if isinstance(text_or_module, str) else text_or_module
  walker = FlopWalker(module, components, signatures, num_devices)
  walker.visit(module.entry, 1.0, None)
  coll = comm.collective_bytes(module)
  return HloCost(dict(walker.flops), dict(walker.elementwise), dict(walker.artefacts), bytes_accessed(module),
                 {k: float(coll[k]) for k in (*comm.KINDS, 'total')}, len(coll['unknown_trip_count']),
                 comm.upcast_bytes(module))
