"""FLOPs by component, bytes accessed and collective bytes of one optimized HLO module, loops counted.

`compiled.cost_analysis()` on CPU counts a while (scan) body once, charges dense FLOPs for masked
dense lowerings, and charges converts fused into gathers over the whole table. This walker recomputes
the figures from the instructions themselves (parsed by litejax.hlo.parse, loops counted by its one
trip-count rule) so each can be attributed and corrected:

  dot          2 · |out| · |contracting|   (a convolution: 2 · its multiply-adds, litejax.hlo.dots)
  elementwise  |out| per arithmetic op, |in| per reduce, |updates| per combiner op of a scatter (a
               scatter-add is the weight gradient of a gather): XLA's HloCostAnalysis convention, so that on
               a program without while loops `total_flops` equals `cost_analysis()['flops']`
               (tests/test_cost.py checks it within 3%, forward and train step). Transcendental ops
               (exp, tanh, ...) are not FLOPs in that convention (XLA counts them apart) and are
               not counted here either.
  lowered dot  a dot that XLA rewrote as elementwise work (hlo_artefacts.lowered_dot) is matmul work of
               its component, at the same FLOPs: the multiply and reduce of a small dot (on TPU only
               the reduce names the dot: hlo_artefacts.untagged_dot_multiply), and the
               weight gradient of gathered slices (expert weights, router rows), lowered as an outer
               product per row (multiply of broadcasts, |out|) plus a scatter-add into the table
               (|updates|, the dot's contraction over the rows of one expert): 2·rows·d·h, what
               litejax.model.bounds charges for a weight-gradient matmul. The scatter-add goes to the
               component of the multiply that produced its updates (the weights' owner: 'experts'
               although the gather sits in the 'dispatch' scope). Reported apart in `lowered_dots`.
  while        body × trip count (a scan over L layers counts L times)
  fusion/call  the called computation, with the caller's metadata as fallback attribution

Each FLOP goes to the component named by the innermost `jax.named_scope` in its op_name metadata
(litejax.hlo.scopes); anything else is 'other', never dropped. Backend artefacts (charged, not
computed usefully: litejax.hlo.artefacts) are reported under `artefacts`.
Bytes accessed: operands + outputs of every unfused instruction, an operand that is only sliced
counting as the slices read (as HloCostAnalysis does). A scatter (unfused, or the root of a fusion)
is charged for its updates, not its table (convention SCATTER_BYTES: the updates read, the rows they
land in read and written, and the indices): XLA's cost model charges the whole table of an in-place
scatter, so a sparse update of a few rows would look as costly as a dense one. Bytes are attributed
to the innermost scope named in the instruction's op_name (`bytes_by_scope`; the train step's
update runs under `jax.named_scope('optimizer')`). Collectives: litejax.hlo.collectives.collective_bytes on
the same parsed module; all-to-all operands widened from bf16 just for XLA:CPU are reported apart
(`collective_upcast_bytes`), so compiled all-to-all bytes compare with the analytic ones.
"""
from __future__ import annotations

import collections
import dataclasses

from litejax.hlo import artefacts as art
from litejax.hlo.dots import conv_flops, dot_flops
from litejax.hlo.parse import Computation, Instr, Module, parse
from litejax.hlo.scopes import by_signature, component_of, near_scope
from litejax.hlo.weights import WeightOrigins

ELEMENTWISE = frozenset(
    'add subtract multiply divide maximum minimum compare select negate abs convert and or xor not '
    'remainder clamp sign floor ceil round-nearest-afz round-nearest-even shift-left shift-right-logical '
    'shift-right-arithmetic is-finite popcnt real imag stochastic-convert'.split())
# Instructions that move no bytes of their own (their callees', if any, are counted), and the ones that read
# only the slices of their first operand: shared with litejax.hlo.expert_reads.
NO_BYTES = frozenset('parameter constant tuple get-tuple-element bitcast while call conditional after-all '
                      'partition-id replica-id iota'.split())
SLICING = ('dynamic-slice', 'gather', 'slice')


@dataclasses.dataclass
class HloCost:
  """Trip-count-aware figures of one compiled program (one device's SPMD program)."""
  flops: dict[str, float]              # component -> dot/conv FLOPs ('other' = dots outside any scope)
  elementwise: dict[str, float]        # component -> elementwise FLOPs (HloCostAnalysis convention)
  artefacts: dict[str, float]          # artefact kind -> FLOPs charged but not useful work
  bytes_accessed: float                # operands + outputs of unfused instructions
  collective_bytes: dict[str, float]   # kind (litejax.hlo.collectives.KINDS) -> bytes this rank moves; 'total'
  unknown_trip_counts: int             # while loops whose trip count is unknown (counted once)
  collective_upcast_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  # kind -> bytes of those collectives that are only there because the CPU backend moves bf16
  # values as f32 (an operand widened by a convert just before the collective)
  elementwise_artefacts: dict[str, float] = dataclasses.field(default_factory=dict)
  # component -> the part of `elementwise` that is an artefact (so useful elementwise = the difference)
  lowered_dots: dict[str, float] = dataclasses.field(default_factory=dict)
  # component -> the part of `flops` that XLA lowered as elementwise ops (outer products, scatter-adds)
  bytes_by_scope: dict[str, float] = dataclasses.field(default_factory=dict)
  # scope (see bytes_accessed) -> the part of bytes_accessed of instructions in that scope

  def useful_elementwise(self, scope: str) -> float:
    """Elementwise FLOPs charged to `scope`, its artefacts taken out."""
    return self.elementwise.get(scope, 0.0) - self.elementwise_artefacts.get(scope, 0.0)

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


def scatter_flops(module: Module, comp: Computation, ins: Instr, ops=ELEMENTWISE) -> float:
  """|updates| × the elementwise ops (of `ops`) of the combiner (a scatter-add: one add per update
  element), as HloCostAnalysis charges it; a scatter that overwrites (combiner returns its update)
  costs 0."""
  n = len(ins.operands) // 2            # scatter(operands..., indices, updates...)
  updates = [comp.instrs.get(o) for o in ins.operands[n + 1:]]
  combiner = module.get(ins.called('to_apply')[0]) if ins.called('to_apply') else None
  if combiner is None or not updates or any(u is None for u in updates):
    return 0.0
  per_element = sum(1 for i in combiner.instrs.values() if i.opcode in ops)
  return float(updates[0].elements * per_element)


def scatter_bytes(comp: Computation, scatter: Instr) -> float | None:
  """SCATTER_BYTES: 3 × the updates' bytes (read; the rows they land in read and written) + the
  indices' bytes; None when an operand is not in `comp`."""
  n = len(scatter.operands) // 2            # scatter(operands..., indices, updates...)
  ops = [comp.instrs.get(o) for o in scatter.operands[n:]]
  if not ops or any(o is None for o in ops):
    return None
  return ops[0].nbytes + 3.0 * sum(o.nbytes for o in ops[1:])


def _fused_scatter_bytes(module: Module, comp: Computation, ins: Instr) -> float | None:
  """SCATTER_BYTES of a fusion whose root is a scatter (XLA:CPU wraps each scatter in one), its
  other operands (the indices' and updates' producers) read as usual."""
  called = module.get(ins.called('calls')[0]) if ins.opcode == 'fusion' and ins.called('calls') else None
  root = called.instrs.get(called.root) if called is not None and called.root else None
  if root is None or root.opcode != 'scatter':
    return None
  return scatter_bytes(called, root)


def instr_bytes_accessed(module: Module, comp: Computation, ins: Instr) -> float:
  """Output + operand bytes of an unfused instruction; an operand that is only sliced (a scan's
  stacked weights, a gathered table) counts as the slices read, as HloCostAnalysis does; a
  scatter counts its updates (SCATTER_BYTES, see the module docstring)."""
  if ins.opcode == 'scatter':
    b = scatter_bytes(comp, ins)
    if b is not None:
      return b
  elif ins.opcode == 'fusion':
    b = _fused_scatter_bytes(module, comp, ins)
    if b is not None:
      return b
  if ins.opcode in SLICING:
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
    sliced = slice_reads(called, p.name) if p is not None else None
    total += src.nbytes if sliced is None else sliced
  return total


def slice_reads(called: Computation, name: str) -> float | None:
  """Bytes a fusion reads of its value `name` when every use only slices it (operand 0 of a slice,
  dynamic-slice or gather, through bitcasts and converts), else None (read whole). Chains are followed: a loop
  fusion computes a fused slice's elements on demand, so a gather of a dynamic-slice (a scanned
  layer's expert table, then K rows of it) reads the gathered rows, not the layer's table."""
  uses = [u for u in called.instrs.values() if name in u.operands]
  if not uses:
    return None
  total = 0.0
  for u in uses:
    if u.opcode == 'bitcast':
      inner = slice_reads(called, u.name)
      if inner is None:
        return None
    elif u.opcode == 'convert' and u.elements:
      # elementwise, computed per element on demand too (XLA:CPU's bf16 round trip between a
      # scanned layer's slice and its gather): the source's bytes of the elements read
      inner = slice_reads(called, u.name)
      if inner is None:
        return None
      inner *= (called.instrs[name].nbytes / max(called.instrs[name].elements, 1)) / (u.nbytes / u.elements)
    elif u.opcode in SLICING and u.operands[0] == name and name not in u.operands[1:]:
      inner = slice_reads(called, u.name)
      inner = u.nbytes if inner is None else min(inner, u.nbytes)
    else:
      return None
    total += inner
  return total


def bytes_accessed(module: Module, scopes: tuple[str, ...] = ()) -> tuple[float, dict[str, float]]:
  """(total, by scope): bytes accessed by one execution, every unfused instruction × the runs of its
  computation; by scope: those of instructions whose op_name names one of `scopes` (innermost)."""
  total, by = 0.0, collections.defaultdict(float)
  for name, times in module.multiplicities(control_flow_only=True).items():
    comp = module[name]
    for ins in comp.instrs.values():
      if ins.opcode in NO_BYTES:
        continue
      b = times * instr_bytes_accessed(module, comp, ins)
      total += b
      scope = component_of(ins.op_name, scopes) if scopes else None
      if scope:
        by[scope] += b
  return total, dict(by)


class FlopWalker:
  """Walks a module from its entry, charging dot and elementwise FLOPs to components (see module doc)."""

  def __init__(self, module: Module, components: tuple[str, ...], signatures=None, num_devices: int = 1):
    self.module, self.components, self.signatures = module, components, signatures
    self.divisors = [r for r in range(1, num_devices + 1) if num_devices % r == 0]
    self.flops: dict[str, float] = collections.defaultdict(float)
    self.elementwise: dict[str, float] = collections.defaultdict(float)
    self.artefacts: dict[str, float] = collections.defaultdict(float)
    self.elementwise_artefacts: dict[str, float] = collections.defaultdict(float)
    self.lowered_dots: dict[str, float] = collections.defaultdict(float)
    self.weights = WeightOrigins(module)   # dots without metadata: the weight they read names them

  def visit(self, comp_name: str, mult: float, ctx: str | None, params: list = (),
            out_scope: str | None = None, param_factors: list = (), param_products: list = ()) -> None:
    """Charges one computation run `mult` times; ctx: the caller's component (fallback attribution);
    params / out_scope / param_factors / param_products: a fused computation's operand scopes,
    consumer scope, operands' masked-expansion factors and operands' lowered-dot components."""
    comp = self.module[comp_name]
    tables = art.gather_tables(comp)
    for ins in comp.instrs.values():
      dot_reduce = art.untagged_dot_multiply(comp, ins)
      own = component_of((dot_reduce or ins).op_name, self.components)
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
      elif op in ELEMENTWISE or op in ('reduce', 'reduce-window'):
        self._elementwise(comp, ins, mult, scope or 'other', ins.name in tables, dot_reduce is not None)
      elif op == 'scatter':
        self._scatter(comp, ins, mult, scope or 'other', param_products)

  def _elementwise(self, comp: Computation, ins: Instr, mult: float, scope: str, table: bool,
                  dot_multiply: bool = False) -> None:
    if ins.opcode in ELEMENTWISE:
      f = mult * ins.elements
    else:   # a reduce: one op per input element
      src = comp.instrs.get(ins.operands[0]) if ins.operands else None
      f = mult * (src.elements if src is not None else ins.elements)
    if dot_multiply or art.is_lowered_dot(ins):
      self.flops[scope] += f
      self.lowered_dots[scope] += f
      return
    self.elementwise[scope] += f
    kind = ('gather_table_convert' if table else
            'bf16_round_trip' if ins.opcode in ELEMENTWISE and art.is_round_trip(comp, ins) else
            'narrow_float_convert' if art.is_narrow_float_convert(comp, ins) else None)
    if kind:
      self.artefacts[kind] += f
      self.elementwise_artefacts[scope] += f

  def _scatter(self, comp: Computation, ins: Instr, mult: float, scope: str, param_products) -> None:
    """A scatter's combiner ops; a scatter-add of outer products is that weight gradient's contraction."""
    f = mult * scatter_flops(self.module, comp, ins)
    upd = comp.instrs.get(ins.operands[-1]) if ins.operands else None
    owner = None
    if upd is not None and upd.opcode == 'parameter' and 0 <= upd.param_index < len(param_products):
      owner = param_products[upd.param_index]
    elif upd is not None:
      owner = self._product_owner(comp, upd.name)
    if not owner:
      self.elementwise[scope] += f
      return
    # One add per update element is the contraction; a combiner that rounds to bf16 after the add
    # (XLA:CPU's bf16 emulation) charges its converts on top: elementwise, and an artefact.
    adds = mult * scatter_flops(self.module, comp, ins, ops=('add',))
    self.flops[owner] += adds
    self.lowered_dots[owner] += adds
    if f > adds:
      self.elementwise[owner] += f - adds
      self.elementwise_artefacts[owner] += f - adds
      self.artefacts['bf16_round_trip'] += f - adds

  def _product_owner(self, comp: Computation, name: str) -> str | None:
    """The component of the lowered outer product that made `name` ('other' if unscoped), else None."""
    prod = art.lowered_dot(self.module, comp, name)
    return None if prod is None else (component_of(prod.op_name, self.components) or 'other')

  def _fusion(self, comp: Computation, ins: Instr, mult: float, own, scope, params, out_scope) -> None:
    if art.feeds_only_gathers(self.module, comp, ins.name):
      # A whole-table elementwise pass (the CPU backend's bf16->f32 convert of expert weights,
      # even of all layers' stacked weights before a scan) feeding only gathers: charged over
      # the table, while only gathered rows are needed.
      before, before_art = dict(self.elementwise), dict(self.elementwise_artefacts)
      for c in ins.called('calls'):
        self.visit(c, mult, scope, [None] * len(ins.operands), None)
      for k, v in list(self.elementwise.items()):   # what the visit did not already call an artefact
        f = (v - before.get(k, 0.0)) - (self.elementwise_artefacts.get(k, 0.0) - before_art.get(k, 0.0))
        self.artefacts['gather_table_convert'] += f
        self.elementwise_artefacts[k] += f
      return
    operand_scopes = [self._scope_of_operand(comp, o, params, out_scope) for o in ins.operands]
    consumer = own or near_scope(comp, ins.name, self.components, params, out_scope, up=False)
    factors = [art.masked_expansion(self.module, comp, o) for o in ins.operands]
    products = [self._product_owner(comp, o) for o in ins.operands]
    for c in ins.called('calls'):
      self.visit(c, mult, scope, operand_scopes, consumer, factors, products)

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
  metadata XLA dropped (litejax.hlo.scopes.by_signature); num_devices: the SPMD device count.
  """
  from litejax.hlo import collectives as comm
  module = parse(text_or_module) if isinstance(text_or_module, str) else text_or_module
  walker = FlopWalker(module, components, signatures, num_devices)
  walker.visit(module.entry, 1.0, None)
  coll = comm.collective_bytes(module)
  total_bytes, bytes_by = bytes_accessed(module, components)
  return HloCost(dict(walker.flops), dict(walker.elementwise), dict(walker.artefacts), total_bytes,
                 {k: float(coll[k]) for k in (*comm.KINDS, 'total')}, len(coll['unknown_trip_count']),
                 comm.upcast_bytes(module), dict(walker.elementwise_artefacts), dict(walker.lowered_dots),
                 bytes_by)
