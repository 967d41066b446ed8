"""SPEC-006's latency scaling laws as a model: step time = compute + communication + memory traffic
+ per-kernel overhead + host calls.

Per chip and per step:
  compute        FLOPs / peak FLOP/s
  communication  collective bytes / ICI bandwidth (bidirectional, all links of the chip)
  memory         bytes accessed / HBM bandwidth; the bytes of kernels that permute dimensions and
                 move the minor (contiguous) one (`moves_minor_dim`) at the chip's transpose
                 bandwidth when it has one: those read or write element by element, while a
                 permutation that keeps the minor dimension copies contiguous rows at about the
                 streaming bandwidth (experiments/decode_breakdown.py measures both kinds); the
                 bytes of kernels that gather rows (`gathers`) at the chip's gather bandwidth
  compute        also a sort kernel's n·log2(n) comparisons per row × the chip's seconds per
                 comparison (`sort_comparisons`; the decode step's sampler sorts the vocabulary)
  overhead       kernels executed × the chip's per-kernel overhead (litejax.hlo.parse.kernel_counts;
                 hardware.Chip.kernel_overhead_s: measured on a host, 0 = not modelled on TPUs)
  host           calls the serving loop makes into the runtime per step (a jitted call's dispatch,
                 device_puts of its inputs, the device_get of its output: the caller counts them,
                 e.g. litejax.inference.decode.HOST_CALLS_PER_STEP) × hardware.Chip.call_overhead_s
The terms are added, not overlapped, so the estimate is what a step costs with nothing hidden behind
anything else; each term is a lower bound for its own resource. The report names the dominant term:
the spec expects arithmetic to stop being the limit at scale ("memory bandwidth and communication
become the limiting factors"); in small steps (a decode step of a few tokens) the two overheads are a
large share: a CPU decode step at batch 1 spends as long in the loop's host calls as in its kernels.

`estimate_compiled` gives the whole estimate of one compiled program (what `bound --decode` and
`generate --json` report). litejax.calibrate.calibration checks the model where it can be checked, on this
CPU (`litejax calibrate`): trust the model on a pod only if here it ranks the configs correctly and
lands within TRUST_BAND of the measured step times.
"""
from __future__ import annotations

import dataclasses

from litejax import units
from litejax.perf import chips as hardware

# The spec's three terms, the per-kernel overhead and the host calls; `dominant` is named among all five.
TERMS = ('compute', 'communication', 'memory', 'overhead', 'host')
# predicted/measured within this band on every calibrated config = the model is trusted here.
TRUST_BAND = (0.67, 1.5)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A step-time estimate, term by term (seconds), the kernels the overhead term counts and the host
  calls the host term counts."""
  compute_s: float
  communication_s: float
  memory_s: float
  overhead_s: float = 0.0
  kernels: float = 0.0
  host_s: float = 0.0
  host_calls: float = 0.0

  @property
  def total_s(self) -> float:
    return self.compute_s + self.communication_s + self.memory_s + self.overhead_s + self.host_s

  @property
  def dominant(self) -> str:
    return max(TERMS, key=lambda t: getattr(self, f'{t}_s'))

  def as_dict(self) -> dict:
    return {'compute_s': self.compute_s, 'communication_s': self.communication_s, 'memory_s': self.memory_s,
            'overhead_s': self.overhead_s, 'kernels': self.kernels, 'host_s': self.host_s,
            'host_calls': self.host_calls, 'total_s': self.total_s, 'dominant': self.dominant}


def estimate(flops: float, collective_bytes: float, bytes_accessed: float, chip: hardware.Chip,
             kernels: float = 0.0, transpose_bytes: float = 0.0, host_calls: float = 0.0,
             gather_bytes: float = 0.0, sort_comparisons: float = 0.0) -> Estimate:
  """Step time of one chip's share: FLOPs, collective bytes, HBM bytes and kernels executed of that
  chip for one step (kernels: litejax.hlo.parse.kernel_count of its program). transpose_bytes: the part of
  bytes_accessed that dimension-permuting kernels move, priced at chip.transpose_bytes_per_s.
  host_calls: the calls into the runtime the caller's loop makes per step, at chip.call_overhead_s.
  gather_bytes: the part of bytes_accessed that row-gathering kernels move (chip.gather_bytes_per_s;
  not also counted in transpose_bytes); sort_comparisons: at chip.sort_comparison_s."""
  if kernels < 0:
    raise ValueError(f'kernels must be >= 0, got {kernels}')
  if host_calls < 0:
    raise ValueError(f'host_calls must be >= 0, got {host_calls}')
  if not 0 <= transpose_bytes + gather_bytes <= bytes_accessed or min(transpose_bytes, gather_bytes) < 0:
    raise ValueError(f'transpose_bytes + gather_bytes must be in [0, bytes_accessed={bytes_accessed}], got '
                     f'{transpose_bytes} + {gather_bytes}')
  if sort_comparisons < 0:
    raise ValueError(f'sort_comparisons must be >= 0, got {sort_comparisons}')
  t_bw = chip.transpose_bytes_per_s or chip.hbm_bytes_per_s
  g_bw = chip.gather_bytes_per_s or chip.hbm_bytes_per_s
  streamed = bytes_accessed - transpose_bytes - gather_bytes
  return Estimate(compute_s=flops / chip.peak_flops + sort_comparisons * chip.sort_comparison_s,
                  communication_s=collective_bytes / chip.ici_bytes_per_s if collective_bytes else 0.0,
                  memory_s=streamed / chip.hbm_bytes_per_s + transpose_bytes / t_bw + gather_bytes / g_bw,
                  overhead_s=kernels * chip.kernel_overhead_s, kernels=float(kernels),
                  host_s=host_calls * chip.call_overhead_s, host_calls=float(host_calls))


def moves_minor_dim(module, ins) -> bool:
  """Whether a top-level instruction is (or fuses) a transpose whose output's minor-most dimension
  is not its operand's: it then strides through memory one element at a time. (XLA:CPU keeps the
  default row-major layouts here, so the last dimension is the contiguous one.)"""
  def moves(i) -> bool:
    dims = i.dims_attr('dimensions')
    return i.opcode == 'transpose' and bool(dims) and dims[-1] != len(dims) - 1
  if ins.opcode != 'fusion':
    return moves(ins)
  return any(moves(i) for c in ins.called('calls') if c in module for i in module[c].instrs.values())


def gathers(module, ins) -> bool:
  """Whether a top-level instruction is (or fuses) a gather: it reads its table row by row."""
  if ins.opcode != 'fusion':
    return ins.opcode == 'gather'
  return any(i.opcode == 'gather' for c in ins.called('calls') if c in module for i in module[c].instrs.values())


def _kernel_bytes(module, which) -> float:
  """Bytes accessed (as litejax.hlo.flops counts them) by the kernels of one execution for which
  `which(module, ins)` holds, × the runs of their computation."""
  from litejax.hlo import parse as hlo, flops as hlo_cost
  total = 0.0
  for name, times in module.multiplicities(control_flow_only=True).items():
    comp = module[name]
    total += times * sum(hlo_cost.instr_bytes_accessed(module, comp, ins) for ins in comp.instrs.values()
                         if hlo.launches_kernel(ins) and which(module, ins))
  return total


def gather_bytes(module) -> float:
  """Bytes accessed by the kernels of one execution that gather rows (`gathers`)."""
  return _kernel_bytes(module, gathers)


def transpose_bytes(module) -> float:
  """Bytes accessed by the kernels of one execution that permute dimensions moving the minor one
  (litejax.hlo.parse.transposes and `moves_minor_dim`) and do not gather (those are `gather_bytes`)."""
  from litejax.hlo import parse as hlo
  return _kernel_bytes(module, lambda m, i: hlo.transposes(m, i) and moves_minor_dim(m, i) and not gathers(m, i))


def sort_comparisons(module) -> float:
  """Comparisons of the sort kernels of one execution: n·log2(n) per sorted row of n elements (a
  comparison sort), rows = the other dimensions' product, × the runs of their computation."""
  import math
  total = 0.0
  for name, times in module.multiplicities(control_flow_only=True).items():
    for ins in module[name].instrs.values():
      if ins.opcode != 'sort' or not ins.shapes:
        continue
      dims = ins.shapes[0][1]
      axis = (ins.dims_attr('dimensions') or (len(dims) - 1,))[0]
      n = dims[axis] if dims else 1
      total += times * (math.prod(dims) / n) * n * math.log2(n) if n > 1 else 0.0
  return total


def estimate_compiled(compiled, chip: hardware.Chip, *, flops: float | None = None,
                      bytes_accessed: float | None = None, host_calls: float = 0.0) -> dict:
  """The full estimate of one compiled program (a jax `Compiled`, or anything with `.as_text()` and
  `.cost_analysis()`) on `chip`: one device's FLOPs, bytes accessed, collective bytes and kernels.

  FLOPs and bytes: `cost_analysis()` when the program has no loop that runs more than once (XLA's
  own figures), else the HLO walker (litejax.hlo.flops; loops × trip count, which cost_analysis()
  counts once). A caller with better figures (e.g. litejax.analysis.per_chip.per_device_cost on TPU) passes them.
  Collective bytes: litejax.hlo.collectives.collective_bytes; kernels: litejax.hlo.parse.kernel_count; transpose
  bytes: `transpose_bytes` (at most the bytes accessed); host_calls: as `estimate` (the caller's
  loop, not the program, makes them). Returns those figures, 'method', and the Estimate's terms,
  total and dominant term.
  """
  from litejax.hlo import collectives as comm, parse as hlo, flops as hlo_cost
  module = hlo.parse(compiled.as_text())
  looped = any(n > 1 for n in module.multiplicities(control_flow_only=True).values())
  if looped:
    w = hlo_cost.walk(module, ())
    f, b, method = w.total_flops, w.bytes_accessed, 'HLO walker (loops x trip count)'
  else:
    ca = compiled.cost_analysis() or {}
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    f, b, method = float(ca.get('flops', 0.0)), float(ca.get('bytes accessed', 0.0)), 'cost_analysis'
  f = f if flops is None else float(flops)
  b = b if bytes_accessed is None else float(bytes_accessed)
  coll = float(comm.collective_bytes(module)['total'])
  gb = min(gather_bytes(module), b)
  tb = min(transpose_bytes(module), b - gb)
  sc = sort_comparisons(module)
  est = estimate(f, coll, b, chip, hlo.kernel_count(module), tb, host_calls, gb, sc)
  return {'flops': f, 'bytes_accessed': b, 'transpose_bytes': tb, 'gather_bytes': gb, 'sort_comparisons': sc,
          'collective_bytes': coll, 'method': method, **est.as_dict()}


def format_estimate(est: dict) -> str:
  """One line: total, each term with its share (overhead and host only when the estimate has them),
  dominant."""
  t = est['total_s']
  names = [n for n in TERMS if n not in ('overhead', 'host') or est.get(f'{n}_s')]
  parts = ', '.join(f"{name} {units.seconds(est[f'{name}_s'])} ({100 * est[f'{name}_s'] / t:.0f}%)" if t else name
                    for name in names)
  return f"step time   {units.seconds(t)} = {parts}; dominated by {est['dominant']}"
