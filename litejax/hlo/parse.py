"""Optimized HLO text, parsed once: computations, instructions, shapes, the call graph, and how many
times each computation runs.

Every reader of compiled programs in litejax (the FLOP walker in litejax.hlo.flops, the byte counter,
the collective counter in litejax.hlo.collectives, the per-chip figures in litejax.analysis.targets) starts from `parse`
and counts loops by ONE rule, `Module.trip_count`:

  1. the while loop's backend config `known_trip_count` (what XLA records for a scan);
  2. failing that, a loop condition comparing the induction variable against an integer constant
     (`compare(%i, %c), direction=LT` with `%c = s32[] constant(N)`), assuming it starts at 0;
  3. failing that, once, and the loop is listed by `Module.unknown_loops`.

A computation reached from a while (body or condition) runs trip-count times its caller; the entry
runs once; both branches of a conditional are counted (an upper bound). Sizes use litejax's one
dtype table (litejax.units.DTYPE_BYTES); a dtype it does not know counts 4 bytes.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

from litejax import units

_SHAPE_RE = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\]')
_HEADER_RE = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
# Callee attributes, and whether a call through them runs the callee once per loop iteration.
_LOOP_KEYS = ('body', 'condition')
_CALL_KEYS = ('to_apply', 'calls', 'true_computation', 'false_computation', 'branch_computations')
# Opcodes whose callees run as unfused instructions (a fusion's or a reduce's callee does not).
_CONTROL_FLOW = ('while', 'call', 'async-start', 'conditional')


@dataclasses.dataclass
class Instr:
  """One HLO instruction: `%name = shape opcode(operands), attrs`."""
  name: str
  shapes: list[tuple[str, tuple[int, ...]]]   # one entry, or a tuple's elements
  opcode: str
  operands: list[str]
  attrs: str
  op_name: str
  param_index: int = -1                      # parameter(i)
  literal: str = ''                          # constant(...)'s text

  @property
  def elements(self) -> int:
    return sum(math.prod(d) for _, d in self.shapes)

  @property
  def nbytes(self) -> float:
    return sum(math.prod(d) * units.dtype_bytes(t, default=4) for t, d in self.shapes)

  def attr(self, key: str) -> str | None:
    # '>' for dim_labels=b01f_01io->b01f (a convolution's)
    m = re.search(rf'\b{key}=(\{{[^}}]*\}}|%?[\w.\->]+)', self.attrs)
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

  @property
  def root(self) -> str | None:
    return next(reversed(self.instrs), None) if self.instrs else None

  @functools.cached_property
  def users(self) -> dict[str, list[str]]:
    """Instruction name -> names of the instructions that read it."""
    u: dict[str, list[str]] = collections.defaultdict(list)
    for ins in self.instrs.values():
      for o in ins.operands:
        u[o].append(ins.name)
    return u


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i]."""
  depth, open_ = 0, s[i]
  close = {'(': ')', '{': '}', '[': ']'}[open_]
  for j in range(i, len(s)):
    if s[j] == open_:
      depth += 1
    elif s[j] == close:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def parse_instr(line: str) -> Instr | None:
  """The instruction on one line of a computation's body (None for anything else)."""
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
  operands = [] if opcode in ('parameter', 'constant') else re.findall(r'%([\w.\-]+)', args)
  param_index = int(args) if opcode == 'parameter' and args.strip().isdigit() else -1
  attrs = rest[end:]
  shapes = [(t, tuple(int(x) for x in d.split(',') if x)) for t, d in _SHAPE_RE.findall(type_str)]
  op = _OPNAME_RE.search(attrs)
  return Instr(name.strip(), shapes, opcode, operands, attrs, op.group(1) if op else '', param_index,
               args if opcode == 'constant' else '')


@dataclasses.dataclass
class Module:
  """A parsed HLO module: its computations by name and the entry's name."""
  computations: dict[str, Computation]
  entry: str

  def __getitem__(self, name: str) -> Computation:
    return self.computations[name]

  def __contains__(self, name: str) -> bool:
    return name in self.computations

  def get(self, name: str) -> Computation | None:
    return self.computations.get(name)

  def trip_count(self, loop: Instr) -> int | None:
    """Iterations of a while instruction by the module's rule (see the module docstring); None if unknown."""
    m = _TRIP_RE.search(loop.attrs)
    if m:
      return int(m.group(1))
    cond = self.get(loop.called('condition')[0]) if loop.called('condition') else None
    return _trip_from_condition(cond) if cond is not None else None

  def trips(self, loop: Instr) -> int:
    """trip_count, or 1 when unknown (the loop is then listed by unknown_loops)."""
    n = self.trip_count(loop)
    return 1 if n is None else n

  def callees(self, ins: Instr) -> list[tuple[str, int]]:
    """(computation, runs per run of `ins`) for every computation `ins` calls."""
    out = []
    for key in _LOOP_KEYS + _CALL_KEYS:
      times = self.trips(ins) if key in _LOOP_KEYS and ins.opcode == 'while' else 1
      out += [(c, times) for c in ins.called(key) if c in self.computations]
    return out

  def multiplicities(self, control_flow_only: bool = False) -> dict[str, float]:
    """Runs of each computation reachable from the entry in one execution of the module.

    control_flow_only: follow only while / call / async-start / conditional, i.e. the computations
    whose instructions run unfused (not a fusion's, a reduce's or a sort's callee)."""
    mult: dict[str, float] = collections.defaultdict(float)

    def visit(name: str, times: float, depth: int) -> None:
      if depth > 64:
        raise ValueError('HLO call graph too deep (recursive HLO?)')
      mult[name] += times
      for ins in self.computations[name].instrs.values():
        if control_flow_only and ins.opcode not in _CONTROL_FLOW:
          continue
        for callee, n in self.callees(ins):
          visit(callee, times * n, depth + 1)

    visit(self.entry, 1.0, 0)
    return dict(mult)

  def unknown_loops(self) -> list[str]:
    """While loops reachable from the entry whose trip count the rule cannot tell (counted once)."""
    return [ins.name for name in self.multiplicities() for ins in self.computations[name].instrs.values()
            if ins.opcode == 'while' and self.trip_count(ins) is None]


def _trip_from_condition(cond: Computation) -> int | None:
  consts = {}
  for ins in cond.instrs.values():
    if ins.opcode == 'constant' and ins.shapes and ins.shapes[0][0] in ('s32', 's64') and not ins.shapes[0][1]:
      v = re.match(r'\s*(-?\d+)\s*$', ins.literal)
      if v:
        consts[ins.name] = int(v.group(1))
  for ins in cond.instrs.values():
    if ins.opcode == 'compare' and 'direction=LT' in ins.attrs:
      for o in ins.operands:
        if o in consts:
          return consts[o]
  return None


def parse(text: str) -> Module:
  """The computations of an HLO module's text (`compiled.as_text()`)."""
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
    ins = parse_instr(line)
    if ins is not None:
      current.instrs[ins.name] = ins
  if not entry:
    raise ValueError('no ENTRY computation in the HLO text')
  return Module(comps, entry)


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
  """(computations, entry name) of an HLO module's text; see `parse`."""
  m = parse(text)
  return m.computations, m.entry


# ------------------------------------------------------------------------------------------ kernels

# Opcodes that run no work of their own when executed: buffer plumbing (parameters, tuples and their
# elements, bitcasts, constants baked into the executable), ordering tokens, and control flow whose
# bodies are counted in their own right (a while, call or conditional is the instructions it runs).
# An async collective is one kernel, counted at its `-start` (all-gather-start, ...); the `-done` only
# waits; a generic async-start is the instructions of the computation it calls.
NO_KERNEL_OPCODES = frozenset({
    'parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant', 'after-all', 'add-dependency',
    'opt-barrier', 'domain', 'partition-id', 'replica-id', 'while', 'call', 'conditional', 'async-start',
    'async-update'})


def launches_kernel(ins: Instr) -> bool:
  """Whether executing `ins` at the top level of a computation runs a kernel (a fusion, a dot, a
  custom-call, a copy, a collective, a scatter/gather, a sort, ...): see NO_KERNEL_OPCODES."""
  return ins.opcode not in NO_KERNEL_OPCODES and not ins.opcode.endswith('-done')


def kernel_counts(module: Module) -> dict[str, float]:
  """Kernels one execution of the module runs, by opcode.

  The top-level instructions of the entry and of every computation it reaches through control flow
  (while bodies and conditions, calls, conditional branches, async computations) that launch work
  (`launches_kernel`), each × its computation's multiplicity: a scanned body counts trip-count times,
  by the module's one trip-count rule; both branches of a conditional count (an upper bound).
  Instructions inside a fusion, or a reduce's or sort's combiner, are part of their caller's kernel.
  """
  counts: dict[str, float] = collections.defaultdict(float)
  for name, times in module.multiplicities(control_flow_only=True).items():
    for ins in module[name].instrs.values():
      if launches_kernel(ins):
        counts[ins.opcode] += times
  return dict(counts)


def kernel_count(module: Module) -> float:
  """Total kernels one execution of the module runs (see `kernel_counts`)."""
  return sum(kernel_counts(module).values())


def transposes(module: Module, ins: Instr) -> bool:
  """Whether a top-level instruction permutes dimensions: a `transpose`, or a fusion with a transpose
  that is not the identity permutation. Such kernels read or write with strides, and run far below
  the streaming memory bandwidth on a CPU (litejax.calibrate.calibration measures it)."""
  def permutes(i: Instr) -> bool:
    dims = i.dims_attr('dimensions')
    return i.opcode == 'transpose' and dims != tuple(range(len(dims)))
  if ins.opcode != 'fusion':
    return permutes(ins)
  return any(permutes(i) for c in ins.called('calls') if c in module for i in module[c].instrs.values())
