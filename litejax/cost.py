"""A small reader of optimized HLO text: FLOPs by component, bytes and collectives, trip-count aware.

`compiled.cost_analysis()` on CPU counts a while (scan) body once, charges dense FLOPs for masked
dense lowerings, and charges converts fused into gathers over the whole table. This walker recomputes
the figures from the instructions themselves so each can be attributed and corrected:

  dot          2 · |out| · |contracting|                 (convolution: 2 · |out| · |kernel| / out_features)
  elementwise  |out| per arithmetic op (transcendentals counted apart), |in| per reduce — the same
               convention as XLA's HloCostAnalysis, so the totals can be checked against it
  while        body × known_trip_count (a scan over L layers counts L times)
  fusion/call  the called computation, with the caller's metadata as fallback attribution

Each FLOP goes to the component named by the innermost `jax.named_scope` in its op_name metadata (the
model wraps its matmuls in scopes named after litejax.bounds.COMPONENTS); a dot that lost its metadata
in an XLA rewrite takes its operands' scope. Anything else is 'other', never dropped.

Backend artefacts (charged, not computed usefully) are reported under `artefacts`:
  gather_table_convert  an elementwise op (a bf16->f32 convert) fused into a gather's table operand:
                        charged over the whole table although only gathered rows are touched.
                        Followed into fusions and across a scan's while-loop carry, so a convert
                        of all layers' stacked expert weights before the loop is caught too.
  masked_dense_dot      a dot whose operand is select(mask, broadcast(x), 0) (jax.lax.ragged_dot's
                        dense CPU lowering): the broadcast's expansion factor is wasted work.
  bf16_round_trip       a convert pair f32->bf16->f32 (or bf16->f32->bf16): XLA:CPU computes bf16
                        ops in f32 and rounds after each; on a bf16 backend neither convert exists.
Collectives: all-to-all operands widened from bf16 just for XLA:CPU are reported apart
(`collective_upcast_bytes`), so compiled all-to-all bytes compare with the analytic ones.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0,
                'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1}
ELEMENTWISE = frozenset(
    'add subtract multiply divide maximum minimum compare select negate abs convert and or xor not '
    'remainder clamp sign floor ceil round-nearest-afz round-nearest-even shift-left shift-right-logical '
    'shift-right-arithmetic is-finite popcnt real imag stochastic-convert'.split())
TRANSCENDENTAL = frozenset(
    'exponential exponential-minus-one log log-plus-one logistic tanh rsqrt sqrt cbrt sine cosine tan '
    'erf power atan2'.split())
COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
_NO_BYTES = frozenset('parameter constant tuple get-tuple-element bitcast while call conditional after-all '
                      'partition-id replica-id iota'.split())
_SHAPE_RE = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\]')
_HEADER_RE = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Instr:
  name: str
  shapes: list[tuple[str, tuple[int, ...]]]   # one entry, or a tuple's elements
  opcode: str
  operands: list[str]
  attrs: str
  op_name: str
  param_index: int = -1                      # parameter(i)

  @property
  def elements(self) -> int:
    return sum(math.prod(d) for _, d in self.shapes)

  @property
  def nbytes(self) -> int:
    return sum(math.prod(d) * _DTYPE_BYTES.get(t, 4) for t, d in self.shapes)

  def attr(self, key: str) -> str | None:
    m = re.search(rf'\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)', self.attrs)
    return m.group(1) if m else None

  def dims_attr(self, key: str) -> tuple[int, ...]:
    v = self.attr(key)
    return tuple(int(x) for x in v.strip('{}').split(',') if x) if v else ()

  def called(self, key: str) -> list[str]:
    v = self.attr(key)
    return re.findall(r'%?([\w.\-]+)', v.strip('{}')) if v else []


@dataclasses.dataclass
class Computation:
  name: str
  instrs: dict[str, Instr]
  is_entry: bool


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i]."""
  depth = 0
  pairs = {'(': ')', '{': '}', '[': ']'}
  close = pairs[s[i]]
  open_ = s[i]
  for j in range(i, len(s)):
    if s[j] == open_:
      depth += 1
    elif s[j] == close:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def _parse_instr(line: str) -> Instr | None:
  line = line.strip()
  if line.startswith('ROOT '):
    line = line[5:]
  if not line.startswith('%') or ' = ' not in line:
    return None
  name, rest = line[1:].split(' = ', 1)
  if rest.startswith('('):
    end = _balanced(rest, 0)
    type_str, rest = rest[:end], rest[end:].lstrip()
  else:
    type_str, rest = rest.split(' ', 1)
  m = re.match(r'([\w\-]+)\(', rest)
  if not m:
    return None
  opcode = m.group(1)
  end = _balanced(rest, m.end() - 1)
  args = rest[m.end():end - 1]
  operands = re.findall(r'%([\w.\-]+)', args)
  if opcode == 'parameter':
    operands = []
    attrs_index = int(args) if args.strip().isdigit() else -1
  else:
    attrs_index = -1
  attrs = rest[end:]
  shapes = [(t, tuple(int(x) for x in d.split(',') if x)) for t, d in _SHAPE_RE.findall(type_str)]
  op = _OPNAME_RE.search(attrs)
  return Instr(name.strip(), shapes, opcode, operands, attrs, op.group(1) if op else '', attrs_index)


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
  """Computations of an HLO module's text, and the entry computation's name."""
  comps: dict[str, Computation] = {}
  entry, current = '', None
  for line in text.splitlines():
    h = _HEADER_RE.match(line)
    if h and not line.startswith(' '):
      current = Computation(h.group(2), {}, bool(h.group(1)))
      comps[current.name] = current
      if current.is_entry:
        entry = current.name
      continue
    if current is None:
      continue
    if line.startswith('}'):
      current = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      current.instrs[ins.name] = ins
  if not entry:
    raise ValueError('no ENTRY computation in HLO text')
  return comps, entry


@dataclasses.dataclass
class HloCost:
  """Trip-count-aware figures of one compiled program (one device's SPMD program)."""
  flops: dict[str, float]              # component -> dot/conv FLOPs ('other' = dots outside any scope)
  elementwise: dict[str, float]        # component -> elementwise FLOPs (HloCostAnalysis convention)
  artefacts: dict[str, float]          # artefact kind -> FLOPs charged but not useful work
  transcendentals: float
  bytes_accessed: float                # operands + outputs of unfused instructions
  collective_bytes: dict[str, float]   # kind -> bytes this rank moves; 'total'
  unknown_trip_counts: int             # while loops without known_trip_count (counted once)
  dots: list[dict]                     # every dot: component, flops (× trips), shape, op_name
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


def component_of(op_name: str, components: tuple[str, ...]) -> str | None:
  """The innermost component scope named in an op_name (e.g. 'jit(f)/transpose(jvp(experts))/dot')."""
  best, pos = None, -1
  for c in components:
    for m in re.finditer(rf'(?<![\w]){re.escape(c)}(?![\w])', op_name):
      if m.start() > pos:
        best, pos = c, m.start()
  return best


def dot_signatures(jaxpr, components: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
  """(component, contraction size, batch size, output size) of every scoped dot_general in a traced
  program (nested jaxprs included; their name stacks are relative to the enclosing eqn)."""
  out = []

  def sub_jaxprs(params):
    for v in params.values():
      for x in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(x, 'eqns'):
          yield x
        elif hasattr(x, 'jaxpr') and hasattr(x.jaxpr, 'eqns'):
          yield x.jaxpr

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
      for sub in sub_jaxprs(eqn.params):
        visit(sub, stack)

  visit(jaxpr.jaxpr if hasattr(jaxpr, 'jaxpr') else jaxpr, '')
  return out


def _nesting(op_name: str, components: tuple[str, ...]) -> int:
  """How many component scopes an op_name is inside (dispatch/.../experts -> 2)."""
  return sum(len(re.findall(rf'(?<![\w]){re.escape(c)}(?![\w])', op_name)) for c in components)


def _dot_flops(ins: Instr, comp: Computation) -> float:
  lhs = comp.instrs.get(ins.operands[0])
  if lhs is None:
    return 0.0
  contracting = math.prod(lhs.shapes[0][1][i] for i in ins.dims_attr('lhs_contracting_dims'))
  return 2.0 * ins.elements * contracting


def _conv_flops(ins: Instr, comp: Computation) -> float:
  rhs = comp.instrs.get(ins.operands[1])
  labels = ins.attr('dim_labels') or ''
  m = re.match(r'[\w]+_([\w]+)->', labels)
  if rhs is None or not m:
    return 0.0
  kernel = rhs.shapes[0][1]
  out_features = kernel[m.group(1).index('o')]
  return 2.0 * ins.elements * math.prod(kernel) / max(out_features, 1)


def _through_layout(comp: Computation, name: str) -> Instr | None:
  """Follows bitcast/copy/transpose/reshape back to the instruction that made the values."""
  ins = comp.instrs.get(name)
  while ins is not None and ins.opcode in ('bitcast', 'copy', 'transpose', 'reshape') and ins.operands:
    ins = comp.instrs.get(ins.operands[0])
  return ins


def _masked_expansion(comps, comp: Computation, operand: str) -> float:
  """Expansion factor when `operand` is select(mask, broadcast(x), broadcast(0)) (else 1)."""
  ins = _through_layout(comp, operand)
  if ins is not None and ins.opcode == 'fusion':
    called = comps.get(ins.called('calls')[0]) if ins.called('calls') else None
    if called is None:
      return 1.0
    root = next((i for i in reversed(list(called.instrs.values()))), None)
    root = _through_layout(called, root.name) if root else None
    comp, ins = called, root
  if ins is None or ins.opcode != 'select' or len(ins.operands) != 3:
    return 1.0
  a, b = (comp.instrs.get(n) for n in ins.operands[1:])
  srcs = []
  for x in (a, b):
    if x is None or x.opcode != 'broadcast':
      return 1.0
    src = comp.instrs.get(x.operands[0])
    srcs.append(src.elements if src is not None else 1)
  if min(srcs) > 1:   # one branch must be a broadcast scalar (the zero fill)
    return 1.0
  return ins.elements / max(max(srcs), 1)


_SLICING = ('dynamic-slice', 'gather', 'slice')


_PASS_THROUGH = ('bitcast', 'copy', 'reshape', 'transpose', 'convert', 'dynamic-slice', 'slice')
_NARROW_FLOATS = ('bf16', 'f16')


def _root(comp: Computation) -> str | None:
  return next(reversed(comp.instrs), None) if comp.instrs else None


def _widened_from(comps, comp: Computation, name: str, depth: int = 0) -> str | None:
  """The narrow float type (bf16/f16) an f32 value was widened from by a convert, through layout
  ops and into a producing fusion's root; None if it was not (the CPU backend computes bf16 in f32
  and widens collective operands it cannot move in bf16)."""
  ins = comp.instrs.get(name)
  while ins is not None and ins.opcode in ('bitcast', 'copy', 'reshape', 'transpose') and ins.operands:
    ins = comp.instrs.get(ins.operands[0])
  if ins is None or depth > 4:
    return None
  if ins.opcode == 'fusion' and ins.called('calls') and ins.called('calls')[0] in comps:
    called = comps[ins.called('calls')[0]]
    return _widened_from(comps, called, _root(called), depth + 1)
  if ins.opcode == 'convert' and ins.operands and ins.shapes[0][0] == 'f32':
    src = comp.instrs.get(ins.operands[0])
    if src is not None and src.shapes and src.shapes[0][0] in _NARROW_FLOATS:
      return src.shapes[0][0]
  return None


def _is_round_trip(comp: Computation, ins: Instr, users: dict[str, list[str]]) -> bool:
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
    if s2 is not None and s2.shapes and s2.shapes[0][0] == t_out and t_in in _NARROW_FLOATS:
      return True
  us = [comp.instrs[u] for u in users.get(ins.name, ()) if u in comp.instrs]
  return (t_out in _NARROW_FLOATS and t_in not in _NARROW_FLOATS and bool(us) and   # inner half
          all(u.opcode == 'convert' and u.shapes[0][0] == t_in for u in us))


def _bytes_accessed(comps, comp: Computation, ins: Instr) -> float:
  """Output + operand bytes of an unfused instruction; an operand that is only sliced (a scan's
  stacked weights, a gathered table) counts as the slices read, as HloCostAnalysis does."""
  if ins.opcode in _SLICING:
    return 2.0 * ins.nbytes
  if ins.opcode == 'dynamic-update-slice':
    upd = comp.instrs.get(ins.operands[1]) if len(ins.operands) > 1 else None
    return 2.0 * (upd.nbytes if upd is not None else ins.nbytes)
  total = float(ins.nbytes)
  called = comps.get(ins.called('calls')[0]) if ins.opcode == 'fusion' and ins.called('calls') else None
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


def walk(text: str, components: tuple[str, ...], signatures: list | None = None,
         num_devices: int = 1) -> HloCost:
  """Walks an optimized HLO module from its entry; see the module docstring.

  signatures: `dot_signatures(jaxpr)` of the traced program. A dot whose metadata XLA dropped is
  matched to the traced dots with the same contraction size whose batch and output sizes are its
  own times a divisor of num_devices (SPMD shards them): first with the batch size equal, then with
  batch-ness alone (XLA may fold a batch dim into the free dims). The batch size is what tells
  attention's QKᵀ (batch B·H) from a gathered expert matmul (batch N·K) when h = head_dim and
  d = seq_len. One component among the matches decides, else its neighbours' scopes do.
  """
  divisors = [r for r in range(1, num_devices + 1) if num_devices % r == 0]

  def by_signature(ins: Instr, comp: Computation) -> str | None:
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

  comps, entry = parse_hlo(text)
  flops: dict[str, float] = collections.defaultdict(float)
  elem: dict[str, float] = collections.defaultdict(float)
  artefacts: dict[str, float] = collections.defaultdict(float)
  coll: dict[str, float] = collections.defaultdict(float)
  coll_upcast: dict[str, float] = collections.defaultdict(float)
  totals = {'trans': 0.0, 'bytes': 0.0, 'unknown': 0}
  dots: list[dict] = []

  users_of: dict[str, dict[str, list[str]]] = {}

  def users(comp: Computation) -> dict[str, list[str]]:
    if comp.name not in users_of:
      u: dict[str, list[str]] = collections.defaultdict(list)
      for ins in comp.instrs.values():
        for o in ins.operands:
          u[o].append(ins.name)
      users_of[comp.name] = u
    return users_of[comp.name]

  def near_scope(comp: Computation, start: str, params, out_scope, down: bool = True, up: bool = True,
                 max_depth: int = 4) -> str | None:
    """The component of the nearest neighbour that names one, consumers first at equal distance.

    XLA rewrites drop the metadata of some dots (batched dots, dots on gathered operands); their
    consumers (the softmax after QKᵀ, the transpose after AV) and producers (the gathered router
    weights) still carry it. A fused computation's parameters resolve to the caller's operands
    (`params`) and its root to the caller's consumers (`out_scope`).
    """
    frontier_down, frontier_up, seen = [start], [start], {start}
    root = list(comp.instrs)[-1] if comp.instrs else None
    for _ in range(max_depth):
      found: list[tuple[int, str, int]] = []   # (nesting, component, order: producers first)
      nxt_down, nxt_up = [], []
      if down:
        for n in frontier_down:
          if n == root and out_scope:
            found.append((1, out_scope, 10_000))
          for u in users(comp).get(n, ()):
            if u in seen:
              continue
            seen.add(u)
            c = component_of(comp.instrs[u].op_name, components)
            if c:
              found.append((_nesting(comp.instrs[u].op_name, components), c, 10_000 + len(found)))
            else:
              nxt_down.append(u)
      if up:
        for n in frontier_up:
          for o in comp.instrs[n].operands if n in comp.instrs else ():
            if o in seen or o not in comp.instrs:
              continue
            seen.add(o)
            src = comp.instrs[o]
            c = component_of(src.op_name, components)
            if c is None and src.opcode == 'parameter' and 0 <= src.param_index < len(params):
              c = params[src.param_index]
            if c:
              found.append((_nesting(src.op_name, components) if src.op_name else 1, c, len(found)))
            else:
              nxt_up.append(o)
      if found:
        # The most nested scope wins (the expert matmuls inside the dispatch scope are 'experts');
        # at equal nesting, producers before consumers, in operand order (AV's lhs is the probs).
        best = max(n for n, _, _ in found)
        ties = sorted((order, c) for n, c, order in found if n == best)
        return ties[0][1]
      frontier_down, frontier_up = nxt_down, nxt_up
    return None

  def feeds_only_gathers(comp: Computation, name: str, callers: tuple = (), depth: int = 0) -> bool:
    """Whether the values of `name` reach compute only as a gather's table operand: through layout
    ops, converts and (dynamic) slices, into fusions, and across a while loop's carry (a scan's
    stacked expert weights, dynamic-sliced per layer, then gathered by expert id)."""
    if depth > 16:
      return False
    us = users(comp).get(name, [])
    reached = False
    if name == _root(comp) and callers:             # leaves a fused computation: the caller's users
      if not feeds_only_gathers(*callers[-1], callers[:-1], depth + 1):
        return False
      reached = True
    for u_name in us:
      u = comp.instrs[u_name]
      if u.opcode == 'gather':
        if u.operands[0] != name:
          return False
      elif u.opcode in _PASS_THROUGH:
        if u.operands[0] != name or not feeds_only_gathers(comp, u_name, callers, depth + 1):
          return False
      elif u.opcode == 'fusion' and u.called('calls'):
        called = comps[u.called('calls')[0]]
        idx = [i for i, o in enumerate(u.operands) if o == name]
        prms = [i for i in called.instrs.values() if i.opcode == 'parameter' and i.param_index in idx]
        if not prms or not all(feeds_only_gathers(called, q.name, callers + ((comp, u_name),), depth + 1)
                               for q in prms):
          return False
      elif u.opcode == 'tuple':
        loops = [comp.instrs[w] for w in users(comp).get(u_name, [])]
        if not loops and u_name == _root(comp):
          continue                                    # a loop body's carry passed on unchanged
        idx = {i for i, o in enumerate(u.operands) if o == name}
        for w in loops:
          if w.opcode != 'while' or not w.called('body'):
            return False
          body = comps[w.called('body')[0]]
          outs = [(body, g.name) for g in body.instrs.values()
                  if g.opcode == 'get-tuple-element' and g.operands and
                  body.instrs.get(g.operands[0]) is not None and body.instrs[g.operands[0]].opcode == 'parameter'
                  and int(g.attr('index') or -1) in idx]
          outs += [(comp, g) for g in users(comp).get(w.name, [])
                   if int(comp.instrs[g].attr('index') or -1) in idx]
          if not all(feeds_only_gathers(c, g, (), depth + 1) for c, g in outs):
            return False
      else:
        return False
    return reached or bool(us)

  def visit(comp_name: str, mult: float, ctx: str | None, fused: bool, params: list = (),
            out_scope: str | None = None, param_factors: list = ()) -> None:
    comp = comps[comp_name]
    # Values that only feed a gather's table operand, through layout ops and converts.
    table_operands = set()
    stack = [ins.operands[0] for ins in comp.instrs.values() if ins.opcode == 'gather' and ins.operands]
    while stack:
      n = stack.pop()
      src = comp.instrs.get(n)
      if n in table_operands or src is None:
        continue
      table_operands.add(n)
      if src.opcode in ('bitcast', 'copy', 'reshape', 'transpose', 'convert', 'dynamic-slice') and src.operands:
        stack.append(src.operands[0])
    for ins in comp.instrs.values():
      own = component_of(ins.op_name, components)
      scope = own or ctx
      op = ins.opcode
      if not fused and op not in _NO_BYTES:
        totals['bytes'] += mult * _bytes_accessed(comps, comp, ins)
      if op == 'fusion' and feeds_only_gathers(comp, ins.name):
        # A whole-table elementwise pass (the CPU backend's bf16->f32 convert of expert weights,
        # even of all layers' stacked weights before a scan) feeding only gathers: charged over
        # the table, while only gathered rows are needed.
        before = sum(elem.values())
        for c in ins.called('calls'):
          visit(c, mult, scope, True, [None] * len(ins.operands), None)
        artefacts['gather_table_convert'] += sum(elem.values()) - before
      elif op == 'fusion':
        operand_scopes = [component_of(comp.instrs[o].op_name, components) or
                          near_scope(comp, o, params, out_scope, down=False) if o in comp.instrs else None
                          for o in ins.operands]
        consumer = own or near_scope(comp, ins.name, params, out_scope, up=False)
        factors = [_masked_expansion(comps, comp, o) for o in ins.operands]
        for c in ins.called('calls'):
          visit(c, mult, scope, True, operand_scopes, consumer, factors)
      elif op == 'while':
        m = _TRIP_RE.search(ins.attrs)
        if m is None:
          totals['unknown'] += 1
        trips = int(m.group(1)) if m else 1
        for c in ins.called('body'):
          visit(c, mult * trips, scope, False)
        for c in ins.called('condition'):
          visit(c, mult * trips, scope, False)
      elif op in ('call', 'async-start'):
        for c in ins.called('to_apply') + ins.called('calls'):
          visit(c, mult, scope, fused)
      elif op == 'conditional':
        for c in ins.called('branch_computations') + ins.called('true_computation') + \
            ins.called('false_computation'):
          visit(c, mult, scope, fused)
      elif op in ('dot', 'convolution'):
        f = mult * (_dot_flops(ins, comp) if op == 'dot' else _conv_flops(ins, comp))
        where = (own or by_signature(ins, comp) or near_scope(comp, ins.name, params, out_scope)
                 or ctx or 'other')
        flops[where] += f
        if op == 'dot':
          factor = 1.0
          for o in ins.operands:
            src = comp.instrs.get(o)
            if src is not None and src.opcode == 'parameter' and 0 <= src.param_index < len(param_factors):
              factor = max(factor, param_factors[src.param_index])
            else:
              factor = max(factor, _masked_expansion(comps, comp, o))
          if factor > 1:
            artefacts['masked_dense_dot'] += f * (1 - 1 / factor)
        dots.append({'component': where, 'flops': f, 'shape': list(ins.shapes[0][1]), 'op_name': ins.op_name})
      elif op in ELEMENTWISE:
        f = mult * ins.elements
        elem[scope or 'other'] += f
        if ins.name in table_operands:
          artefacts['gather_table_convert'] += f
        elif _is_round_trip(comp, ins, users(comp)):
          artefacts['bf16_round_trip'] += f
      elif op in TRANSCENDENTAL:
        totals['trans'] += mult * ins.elements
      elif op in ('reduce', 'reduce-window'):
        src = comp.instrs.get(ins.operands[0]) if ins.operands else None
        n_in = src.elements if src is not None else ins.elements
        elem[scope or 'other'] += mult * n_in
      base = op.removesuffix('-start')
      if base in COLLECTIVES and not op.endswith('-done'):
        moved = (ins.nbytes if base == 'all-gather' else
                 sum(comp.instrs[o].nbytes for o in ins.operands if o in comp.instrs))
        coll[base] += mult * moved
        if base == 'all-to-all':   # operands the CPU backend widened from bf16: 2 of their 4 bytes
          for o in ins.operands:
            narrow = _widened_from(comps, comp, o) if o in comp.instrs else None
            if narrow:
              src = comp.instrs[o]
              coll_upcast[base] += mult * (src.nbytes - src.elements * _DTYPE_BYTES[narrow])

  visit(entry, 1.0, None, False)
  coll_out = dict(coll)
  coll_out['total'] = float(sum(coll.values()))
  return HloCost(dict(flops), dict(elem), dict(artefacts), totals['trans'], totals['bytes'], coll_out,
                 int(totals['unknown']), dots, dict(coll_upcast))


def to_json(cost: HloCost) -> str:
  return json.dumps(dataclasses.asdict(cost))


# ------------------------------------------------------------------------------------------ compile

def _jax():
  import jax  # noqa: F401  (imported lazily: `litejax bound --devices N` sets XLA_FLAGS first)
  return jax


def make_mesh_for(cfg, num_devices: int | None = None):
  """(cfg, mesh) over the first `num_devices` local devices; one device gets a 1×1×1 mesh."""
  jax = _jax()
  from litejax import sharding
  from litejax.config import MeshConfig
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if len(devices) == 1:
    cfg = cfg.replace(mesh=MeshConfig(data=1, expert=1, tensor=1))
  return cfg, sharding.make_mesh(cfg.mesh, devices)


# Checked on jax 0.10.2 CPU (forward, scanned train step, 8-way expert parallel, bf16 gather): the
# optimized HLO text and memory_analysis() are identical with and without this option.
_ANALYSIS_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


@dataclasses.dataclass
class CompiledProgram:
  """One lowered-and-compiled program and the numbers needed to read it per token."""
  compiled: object
  hlo_text: str
  cfg: object
  mesh: object
  train: bool
  global_batch: int
  seq_len: int
  compile_seconds: float
  expert_parallel: bool
  signatures: list            # dot_signatures of the traced program

  @property
  def num_devices(self) -> int:
    return int(self.mesh.size)

  @property
  def tokens(self) -> int:
    return self.global_batch * self.seq_len

  @property
  def tokens_per_group(self) -> int:
    """N: tokens one device (source rank) routes together in one MoE call."""
    from litejax import sharding
    s = sharding.mesh_sizes(self.mesh)
    return self.tokens // (s['data'] * s['expert'])


def compile_program(cfg, *, train: bool = False, num_devices: int | None = None,
                    global_batch: int | None = None, mesh=None) -> CompiledProgram:
  """Lowers and compiles the forward pass (or a whole training step) from abstract inputs.

  Parameters, optimizer state and tokens are ShapeDtypeStructs carrying their shardings, so nothing
  is allocated whatever the parameter count. global_batch defaults to one sequence per batch rank
  (data · expert): per-token figures depend on it only through capacity rounding.
  """
  import time
  jax = _jax()
  import jax.numpy as jnp
  from flax import nnx
  from litejax import sharding

  if mesh is None:
    cfg, mesh = make_mesh_for(cfg, num_devices)
  sizes = sharding.mesh_sizes(mesh)
  b = global_batch or sizes['data'] * sizes['expert']
  s = cfg.model.seq_len
  sharding.validate_mesh(cfg, mesh, b)
  tok_sh = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=tok_sh)
  t0 = time.perf_counter()
  from litejax import train_step as ts
  tx = ts.make_optimizer(cfg.train)
  graphdef, abstract, shardings = ts.state_layout(cfg, mesh, tx)
  if train:
    program, args = ts.make_train_step(cfg, graphdef, tx, shardings, tok_sh), (abstract, tokens, tokens)
  else:
    def forward(params, extra, tokens_bs):
      logits_bsv, _ = nnx.merge(graphdef, params, extra)(tokens_bs)
      return logits_bsv

    logits_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tok_sh.spec, None))
    program, args = jax.jit(forward, out_shardings=logits_sh), (abstract['params'], abstract['extra'], tokens)
  from litejax import bounds
  with jax.set_mesh(mesh):   # the MoE layers choose expert-parallel dispatch from the mesh
    traced = program.trace(*args)
    signatures = dot_signatures(traced.jaxpr, bounds.COMPONENTS)
    # The executable is never run (its inputs are abstract): only the optimized HLO is read, and the
    # HLO passes run the same whatever LLVM's optimization level; level 0 halves CPU compile time.
    compiled = traced.lower().compile(compiler_options=_ANALYSIS_COMPILER_OPTIONS)
  seconds = time.perf_counter() - t0
  return CompiledProgram(compiled, compiled.as_text(), cfg, mesh, train, b, s, seconds, mesh.size > 1,
                         signatures)


# ------------------------------------------------------------------------------------------ report

OUTSIDE_BOUND = ('elementwise', 'other')   # rows of by_component that are not bounded matmul work


def analytic_per_token(cfg, tokens_per_group: int, *, train: bool = False,
                       expert_parallel: bool = False, expert_ranks: int = 1) -> dict[str, float]:
  """The analytic matmul FLOPs per token by component, with the padding of the path that runs.

  Single-device dispatch pads as litejax.bounds says. Expert-parallel dispatch (litejax.ep_plan.plan)
  runs `einsum` as `capacity`, and its gather path computes the slots packed per destination rank
  (≈ capacity_factor·K rows per token, not K).
  """
  from litejax import bounds
  from litejax.config import resolve_dispatch
  path = resolve_dispatch(cfg.moe, tokens_per_group)
  if expert_parallel and path == 'einsum':
    path = 'capacity'
  out = bounds.forward_flops_per_token(cfg, tokens_per_group, dispatch=path)
  if expert_parallel and cfg.model.num_moe_layers:
    from litejax import ep_plan
    p = ep_plan.plan(cfg.moe, tokens_per_group, expert_ranks)
    rows = p.total_slots * (cfg.moe.k_expert if p.aligned else 1) / tokens_per_group
    out['experts'] = cfg.model.num_moe_layers * rows * bounds.expert_flops(cfg)
  if train:
    out = {k: bounds.BWD_MULTIPLIER * v for k, v in out.items()}
  return out


def _collectives(prog: CompiledProgram, cost: HloCost) -> dict:
  """Collective bytes per rank for the whole program: compiled (as XLA:CPU moves them, and the
  all-to-all at the program's dtypes) and analytic (the expert-parallel all-to-alls).

  The analytic figure (litejax.ep_plan) counts both all-to-alls of every MoE layer's forward pass,
  dispatch out and combine back (+ the expert ids the gather path sends), twice in a training step
  (their transposes). It is compared with the compiled all-to-all bytes only; other kinds (the
  partitioner's all-gathers, gradient all-reduces) are listed beside it, not hidden. XLA:CPU moves
  bf16 all-to-all operands as f32 (a convert just before the collective doubles their bytes): the
  comparable figure counts those at the program's 2 bytes and reports the difference apart.
  """
  from litejax import comm, ep_plan, sharding
  by_kind = {k: float(v) for k, v in comm.collective_bytes(prog.hlo_text).items() if isinstance(v, (int, float))}
  upcast = float(cost.collective_upcast_bytes.get('all-to-all', 0.0))
  a2a = by_kind.get('all_to_all', 0.0) - upcast
  analytic = {'dispatch': 0.0, 'combine': 0.0, 'metadata': 0.0, 'total': 0.0}
  s = sharding.mesh_sizes(prog.mesh)
  if prog.expert_parallel and s['expert'] > 1 and prog.cfg.model.num_moe_layers:
    dt = 2 if prog.cfg.model.dtype == 'bfloat16' else 4
    per_layer = ep_plan.analytic_all_to_all_bytes_per_rank(prog.cfg, prog.tokens, s, dt)
    times = prog.cfg.model.num_moe_layers * (2 if prog.train else 1)
    analytic = {k: float(per_layer[k] * times) for k in analytic}
  other = {k: v for k, v in by_kind.items() if k not in ('all_to_all', 'total') and v}
  notes = []
  if upcast:
    notes.append(f'all-to-all: XLA:CPU moves bf16 operands as f32; {upcast:.4g} of the '
                 f'{by_kind["all_to_all"]:.4g} bytes are that widening (counted at 2 bytes here)')
  if other.get('all_gather'):
    notes.append('all-gather: not in the analytic figure; inserted by the SPMD partitioner (e.g. '
                 'lax.top_k over batch-sharded scores would gather every token to every rank)')
  if other.get('all_reduce'):
    notes.append('all-reduce: not in the analytic figure (gradient / statistics reductions)')
  return {'compiled_all_to_all': a2a, 'analytic': analytic, 'by_kind': by_kind, 'upcast': upcast,
          'other': other, 'notes': notes}


def report(prog: CompiledProgram, tol: float = 0.03) -> dict:
  """Analytic vs compiled per-token figures of a compiled program (the `litejax bound --json` object).

  Compiled figures are the SPMD program's per-device work × devices / global tokens. The bounded
  work is matmul work (dots by component); elementwise FLOPs, XLA's raw cost_analysis() and backend
  artefacts are reported beside it, never folded in silently.
  """
  from litejax import bounds
  cfg = prog.cfg
  cost = walk(prog.hlo_text, bounds.COMPONENTS, prog.signatures, prog.num_devices)
  per_tok = prog.num_devices / prog.tokens
  from litejax import sharding
  sizes = sharding.mesh_sizes(prog.mesh)
  analytic = analytic_per_token(cfg, prog.tokens_per_group, train=prog.train,
                                expert_parallel=prog.expert_parallel, expert_ranks=sizes['expert'])
  by = {}
  for c in bounds.COMPONENTS:
    a, k = analytic[c], cost.flops.get(c, 0.0) * per_tok
    by[c] = {'analytic': a, 'compiled': k, 'ratio': (k / a) if a else (1.0 if k == 0 else math.inf)}
  other = cost.flops.get('other', 0.0) * per_tok
  by['other'] = {'analytic': 0.0, 'compiled': other, 'ratio': 1.0 if other == 0 else math.inf}
  elem_a = bounds.elementwise_flops_per_token(cfg) * (bounds.BWD_MULTIPLIER if prog.train else 1)
  elem_k = (cost.elementwise_flops - sum(cost.artefacts.values())) * per_tok
  by['elementwise'] = {'analytic': elem_a, 'compiled': elem_k, 'ratio': elem_k / elem_a if elem_a else math.inf}
  fa = sum(analytic.values())
  fk = cost.dot_flops * per_tok
  params = bounds.param_counts(cfg)
  ca = prog.compiled.cost_analysis() or {}
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  mem = prog.compiled.memory_analysis()
  coll = _collectives(prog, cost)
  out = {
      'flops_per_token_analytic': fa,
      'flops_per_token_compiled': fk,
      'ratio': fk / fa,
      'by_component': by,
      'flops_per_token_analytic_unpadded': sum(bounds.forward_flops_per_token(cfg).values()) *
                                           (bounds.BWD_MULTIPLIER if prog.train else 1),
      'flops_per_token_compiled_with_elementwise': (cost.useful_flops) * per_tok,
      'flops_per_token_xla_cost_analysis': float(ca.get('flops', 0.0)) * per_tok,
      'artefacts_per_token': {k: v * per_tok for k, v in cost.artefacts.items()},
      'bytes_accessed_per_token_xla': float(ca.get('bytes accessed', 0.0)) * per_tok,
      'bytes_accessed_per_token': cost.bytes_accessed * per_tok,
      'unknown_trip_counts': cost.unknown_trip_counts,
      'params_total': params.total,
      'params_active_per_token': params.active_per_token,
      'params_expert_active_per_token': params.expert_active_per_token,
      'collective_bytes_per_rank': coll['compiled_all_to_all'],          # all-to-all, program dtypes
      'collective_bytes_per_rank_analytic': coll['analytic']['total'],    # all-to-all: dispatch + combine
      'collective_bytes_per_rank_analytic_by_buffer': coll['analytic'],
      'collective_bytes_per_rank_by_kind': coll['by_kind'],              # as XLA:CPU moves them
      'collective_bytes_per_rank_all_kinds': coll['by_kind'].get('total', 0.0),
      'collective_bytes_per_rank_other_kinds': coll['other'],
      'collective_bytes_per_rank_cpu_bf16_upcast': coll['upcast'],
      'collective_notes': coll['notes'],
      'dispatch': resolve_dispatch_for(prog),
      'compile_seconds': prog.compile_seconds,
      'train': prog.train,
      'devices': prog.num_devices,
      'mesh': sizes,
      'global_batch': prog.global_batch,
      'seq_len': prog.seq_len,
      'tokens_per_group': prog.tokens_per_group,
      'memory_bytes_per_device': _memory(mem),
      'spec_formula': bounds.spec_formula(cfg),
      'tol': tol,
  }
  out['violations'] = violations(out, tol)
  return out


def resolve_dispatch_for(prog: CompiledProgram) -> str:
  """The dispatch path that ran ('none' without MoE layers; expert-parallel runs einsum as capacity)."""
  from litejax.config import resolve_dispatch
  if not prog.cfg.model.num_moe_layers:
    return 'none'
  path = resolve_dispatch(prog.cfg.moe, prog.tokens_per_group)
  if prog.expert_parallel and path == 'einsum':
    path = 'capacity'
  return path + (' (expert-parallel)' if prog.expert_parallel else '')


def _memory(mem) -> dict[str, int]:
  if mem is None:
    return {}
  keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes', 'alias_size_in_bytes',
          'generated_code_size_in_bytes')
  return {k.removesuffix('_size_in_bytes').removesuffix('_in_bytes'): int(getattr(mem, k, 0) or 0)
          for k in keys}


def violations(rep: dict, tol: float) -> list[str]:
  """Why the compiled matmul work exceeds the analytic bound (with padding) by more than `tol`.

  The total is checked, and so is each component's excess against tol × the total bound, so a
  blow-up in one component cannot hide behind slack in another.
  """
  out = []
  fa, fk = rep['flops_per_token_analytic'], rep['flops_per_token_compiled']
  excess = []
  for name, row in rep['by_component'].items():
    if name == 'elementwise':
      continue
    over = row['compiled'] - row['analytic']
    if over > tol * fa:
      excess.append((over, name))
  excess.sort(reverse=True)
  if fk > (1 + tol) * fa:
    worst = ', '.join(f'{n} (+{o / fa:.1%} of the bound)' for o, n in excess) or 'spread over components'
    out.append(f'compiled {fk:.4g} FLOPs/token exceeds the analytic bound {fa:.4g} by '
               f'{fk / fa - 1:.1%} (> {tol:.0%}): {worst}')
  else:
    for o, n in excess:
      out.append(f'component {n}: compiled {rep["by_component"][n]["compiled"]:.4g} exceeds analytic '
                 f'{rep["by_component"][n]["analytic"]:.4g} by {o / fa:.1%} of the bound (> {tol:.0%})')
  return out


def bound(cfg, *, train: bool = False, num_devices: int | None = None, global_batch: int | None = None,
          tol: float = 0.03) -> dict:
  """Compile `cfg` from abstract inputs and return its report (see `report`)."""
  return report(compile_program(cfg, train=train, num_devices=num_devices, global_batch=global_batch), tol)
