"""Compile targets: an emulated CPU mesh (`cpu:N`) or a real TPU topology (`v5p:8x8x8`) from a CPU machine.

A TPU target needs no TPU: with libtpu installed (`pip install 'litejax[tpu]'`),
`jax.experimental.topologies.get_topology_desc` returns compile-only devices of the named slice, a
mesh over them takes the config's rules as any other, and `jit(...).lower(...).compile()` gives that
chip's `cost_analysis()` and `memory_analysis()`. This module parses the spec, quiets libtpu's
cloud-VM probes (litejax.env), and turns one compiled program into the per-chip report of `litejax bound --target`
and `litejax plan`.
"""
from __future__ import annotations

import dataclasses
import math
import re

from litejax import env, jaxcompat, units
from litejax.perf import chips as hardware
from litejax.config import ConfigError

_SPEC_RE = re.compile(r'^(cpu|v4|v5p|v5e|v6e):(\d+(?:x\d+)*)$')
_DIMS = {'v4': 3, 'v5p': 3, 'v5e': 2, 'v6e': 2}

class TargetError(ValueError):
  """A --target spec is malformed, unknown, or needs something that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A resolved compile target: its devices and (for TPU) the chip's facts."""
  spec: str
  platform: str                 # 'cpu' or 'tpu'
  generation: str | None        # 'v5p', ... (None for cpu)
  dims: tuple[int, ...]         # chip grid (cpu: (N,))
  devices: tuple
  chip: hardware.Chip | None

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)


def parse_target(spec: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:8x8x8' -> ('v5p', (8, 8, 8)); 'cpu:8' -> ('cpu', (8,)). TargetError when malformed."""
  m = _SPEC_RE.match(spec.strip().lower())
  if not m:
    raise TargetError(f'--target {spec!r}: expected cpu:N or GENERATION:AxB[xC] with GENERATION one of '
                      f'{sorted(_DIMS)} (e.g. v5p:8x8x8, v5e:16x16, v6e:8x8, v4:4x4x4)')
  kind, dims = m.group(1), tuple(int(x) for x in m.group(2).split('x'))
  want = 1 if kind == 'cpu' else _DIMS[kind]
  if len(dims) != want or min(dims) < 1:
    shape = 'N' if kind == 'cpu' else 'x'.join('ABC'[:want])
    raise TargetError(f'--target {spec!r}: {kind} takes {kind}:{shape} ({want} positive sizes)')
  return kind, dims


def libtpu_requirement() -> str:
  """The libtpu requirement jax's own `tpu` extra pins for the installed jax (e.g. 'libtpu==0.0.42.*')."""
  from importlib import metadata
  for req in metadata.requires('jax') or ():
    if req.startswith('libtpu') and 'extra == "tpu"' in req:
      return req.split(';')[0].strip()
  return 'libtpu'


def libtpu_version() -> str | None:
  from importlib import metadata
  try:
    return metadata.version('libtpu')
  except metadata.PackageNotFoundError:
    return None


def _missing_libtpu(spec: str) -> TargetError:
  import jax
  return TargetError(
      f"--target {spec}: compiling for TPU needs libtpu, which is not installed. Install the extra: "
      f"pip install 'litejax[tpu]'  (it brings {libtpu_requirement()}, the libtpu that jax {jax.__version__}'s "
      f"jax[tpu] pins; no TPU is needed). Or use --target cpu:N for an emulated CPU mesh.")


def _tpu_devices(spec: str, generation: str, dims: tuple[int, ...]) -> list:
  if libtpu_version() is None:
    raise _missing_libtpu(spec)
  env.quiet_libtpu(generation)   # before libtpu loads
  jaxcompat.prefer_cpu_backend()
  from jax.experimental import topologies
  name = f'{generation}:{"x".join(map(str, dims))}'
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:  # libtpu raises JaxRuntimeError with its own message for bad shapes
    raise TargetError(f'--target {spec}: libtpu rejected topology {name!r}: {str(e).splitlines()[0]}') from None


def _cpu_devices(spec: str, n: int) -> list:
  import jax
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise TargetError(f'--target {spec}: only {len(devices)} CPU devices in this process; start it with '
                      f'XLA_FLAGS=--xla_force_host_platform_device_count={n} (litejax commands set it '
                      f'before importing jax)')
  return devices[:n]


def resolve(spec: str) -> Target:
  """The Target of a spec: its devices (compile-only for TPU) and chip facts."""
  kind, dims = parse_target(spec)
  if kind == 'cpu':
    return Target(spec, 'cpu', None, dims, tuple(_cpu_devices(spec, dims[0])), None)
  devices = _tpu_devices(spec, kind, dims)
  return Target(spec, 'tpu', kind, dims, tuple(devices), hardware.chip(kind))


def target_mesh(cfg, target: Target):
  """(cfg, mesh): the config's (data, expert, tensor) mesh rules laid over the target's devices.

  `mesh.data: -1` takes whatever the fixed axes leave, as on a CPU mesh; jax.make_mesh orders
  TPU devices by their physical coordinates so mesh axes follow the torus.
  """
  from litejax import sharding
  from litejax.config import MeshConfig
  devices = list(target.devices)
  if len(devices) == 1:
    cfg = cfg.replace(mesh=MeshConfig(data=1, expert=1, tensor=1))
  try:
    return cfg, sharding.make_mesh(cfg.mesh, devices)
  except ConfigError as e:
    raise ConfigError(f'{e} (target {target.spec}: {len(devices)} devices)') from None
  except NotImplementedError:
    # A mesh axis that is no product of whole torus axes (expert=8 on 16x20x28): split physical
    # axes, as a user of that slice would have to.
    return cfg, _split_axes_mesh(cfg, devices)


def _split_axes_mesh(cfg, devices):
  import jax
  import numpy as np
  from jax.experimental import mesh_utils

  from litejax import sharding
  sizes = sharding._resolve_sizes(cfg.mesh, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except Exception:  # jax's axis splitter fails on some shapes (16x20x28 with 8): plain device order
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  auto = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.sharding.Mesh(grid, sharding.AXES, axis_types=auto)


# ------------------------------------------------------------------------------------------ per chip

def _cost(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  return {'flops': float(ca.get('flops', 0.0)), 'bytes_accessed': float(ca.get('bytes accessed', 0.0))}


def _platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def per_device_cost(prog) -> dict[str, float]:
  """FLOPs and bytes accessed of one device for one step, loops counted by their trip count.

  XLA's cost_analysis() counts a while (scan) body once, on TPU as on CPU. Loops are counted by
  litejax.hlo.parse's one trip-count rule:
    CPU  the HLO walker (litejax.hlo.flops): dots + elementwise FLOPs (XLA's convention; it equals
         cost_analysis() within 3% on loop-free programs, tests/test_cost.py) and bytes accessed,
         every computation × its multiplicity.
    TPU  the chip's own cost_analysis(): the TPU compiler lowers dots to windowed convolutions that
         the walker does not price. With scanned layers, cost is affine in depth: two shallow
         unrolled compiles (one and two periods of `moe_every`) give the per-period cost b and the
         rest a, and the step costs a + b·n, n the trip count of the layer scan (hlo.Module.trip_count
         of the entry's while loops). Loops inside a layer (a sort's) stay counted once.
  """
  from litejax.model import bounds
  from litejax.hlo import parse as hlo, flops as hlo_flops
  if _platform(prog.mesh) != 'tpu':
    w = hlo_flops.walk(prog.hlo_text, bounds.COMPONENTS, prog.signatures, prog.num_devices)
    return {'flops': w.total_flops, 'bytes_accessed': w.bytes_accessed,
            'method': 'HLO walker (loops x trip count)'}
  module = hlo.parse(prog.hlo_text)
  trips = {module.trips(i) for i in module[module.entry].instrs.values() if i.opcode == 'while'}
  if not (prog.cfg.model.scan_layers and trips):
    return {**_cost(prog.compiled), 'method': 'cost_analysis'}
  if len(trips) != 1:
    raise ValueError(f'per_device_cost: the layer scans run {sorted(trips)} times; expected one trip count')
  return _extrapolate_over_depth(prog, trips.pop())


def _extrapolate_over_depth(prog, periods: int) -> dict[str, float]:
  from litejax.analysis import bound as bound_report
  cfg = prog.cfg
  period = max(cfg.model.moe_every, 1)
  shallow = []
  for n in (1, 2):
    c = cfg.replace(model=dataclasses.replace(cfg.model, num_layers=n * period, scan_layers=False))
    p = bound_report.compile_program(c, train=prog.train, mesh=prog.mesh, global_batch=prog.global_batch)
    shallow.append(_cost(p.compiled))
  out = {}
  for k in ('flops', 'bytes_accessed'):
    b = shallow[1][k] - shallow[0][k]
    out[k] = shallow[0][k] - b + b * periods
  return {**out, 'method': f'cost_analysis extrapolated over depth (1 and 2 periods of {period} layer(s), '
                           f'x{periods:g} scan trips)'}


def memory_per_device(compiled) -> dict[str, int]:
  """memory_analysis() of one device: arguments, outputs, temporaries, aliased, code; and the total."""
  mem = compiled.memory_analysis()
  get = lambda k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)  # noqa: E731
  out = {k: get(k) for k in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  # Donated arguments alias outputs (the train step's state): counted once.
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out['generated_code']
  return out


def verdict(need_bytes: float, have_bytes: float) -> dict:
  """'fits' / 'does not fit' with the margin: how much is left over, or how many times too big."""
  fits = need_bytes <= have_bytes
  return {'fits': fits, 'verdict': 'fits' if fits else 'does not fit',
          'need_bytes': float(need_bytes), 'hbm_bytes': float(have_bytes),
          'headroom_bytes': float(have_bytes - need_bytes), 'need_over_hbm': need_bytes / have_bytes}


def per_chip_report(prog, target: Target, chip: hardware.Chip | None = None) -> dict:
  """The per-chip view of one compiled step on `target`.

  FLOPs per step and per token, HBM needed per chip (memory_analysis: arguments, outputs,
  temporaries) against the chip's HBM with a verdict, collective bytes per chip by kind, and the
  latency model's step time term by term. For cpu:N targets, `chip` (e.g. a calibrated host) is
  optional; without it there is no verdict or latency.
  """
  from litejax.hlo import collectives
  from litejax.perf import latency
  chip = chip or target.chip
  dpc = target.devices_per_chip
  c = per_device_cost(prog)
  mem = memory_per_device(prog.compiled)
  coll = collectives.collective_bytes(prog.hlo_text)
  kinds = {k: float(v) * dpc for k, v in coll.items() if k in collectives.KINDS}
  flops_chip = c['flops'] * dpc
  out = {
      'target': target.spec, 'generation': target.generation, 'chips': target.chips,
      'devices': len(target.devices), 'devices_per_chip': dpc,
      'global_batch': prog.global_batch, 'seq_len': prog.seq_len, 'train': prog.train,
      'flops_per_step_per_chip': flops_chip,
      'flops_per_token': flops_chip * target.chips / prog.tokens,
      'flops_method': c['method'],
      'bytes_accessed_per_step_per_chip': c['bytes_accessed'] * dpc,
      'memory_per_chip': {k: v * dpc for k, v in mem.items()},
      'collective_bytes_per_chip': {**kinds, 'total': sum(kinds.values())},
      'unknown_trip_counts': len(coll.get('unknown_trip_count', ())),
      **analytic_comparison(prog, flops_chip * target.chips / prog.tokens),
  }
  from litejax.analysis import train_temp
  temp = train_temp.temp_report(prog, mem)
  if temp:   # the sparse step's temporaries against its touched rows (per device), as `litejax bound --train`
    out['temp_cpu_bf16_table_copy_per_device'] = temp['temp_cpu_bf16_table_copy']
    out['temp_check'] = temp['check']
  if chip is not None:
    out['chip'] = chip.as_dict()
    if chip.hbm_bytes:
      out['fit'] = verdict(out['memory_per_chip']['total'], chip.hbm_bytes)
    est = latency.estimate(flops_chip, out['collective_bytes_per_chip']['total'],
                           out['bytes_accessed_per_step_per_chip'], chip)
    out['latency'] = est.as_dict()
    out['tokens_per_s'] = prog.tokens / est.total_s if est.total_s else None
  return out


def analytic_comparison(prog, flops_per_token: float) -> dict:
  """`flops_per_token_analytic` (litejax.analysis.bound.analytic_per_token: the matmul bound with the padding
  of the path that runs, at the same tokens per group) and `ratio` = compiled / analytic, as in
  the CPU report. On TPU the compiled figure is the chip's cost_analysis(), which counts
  elementwise work too (the walker cannot price the TPU's convolutions, so it cannot be split
  off): the ratio sits a little above 1 by that share; `flops_per_token_elementwise_estimate`
  (litejax.model.bounds) says how much to expect."""
  from litejax.model import bounds
  from litejax.analysis import bound as bound_report
  from litejax import sharding
  sizes = sharding.mesh_sizes(prog.mesh)
  analytic = sum(bound_report.analytic_per_token(prog.cfg, prog.tokens_per_group, train=prog.train,
                                         expert_parallel=prog.expert_parallel,
                                         expert_ranks=sizes['expert']).values())
  elem = bounds.elementwise_flops_per_token(prog.cfg) * (bounds.BWD_MULTIPLIER if prog.train else 1)
  return {'flops_per_token_analytic': analytic, 'ratio': flops_per_token / analytic if analytic else math.inf,
          'flops_per_token_elementwise_estimate': elem, 'tokens_per_group': prog.tokens_per_group}


def format_per_chip(rep: dict) -> list[str]:
  """Human-readable lines of a per_chip_report."""
  h = units.si
  hb = lambda n: units.si(n, 'B')  # noqa: E731
  kind = 'train step' if rep['train'] else 'forward'
  lines = [f"per chip on {rep['target']} ({rep['chips']} chips, {rep['devices']} devices; {kind}, "
           f"batch {rep['global_batch']}x{rep['seq_len']})"
           + (f"  -- the TPU compiler refused it: {rep['compiler_refused']}" if 'compiler_refused' in rep else ''),
           f"  FLOPs        {h(rep['flops_per_step_per_chip'])} per step per chip, "
           f"{h(rep['flops_per_token'])} per token  [{rep['flops_method']}]"]
  if 'ratio' in rep:
    lines.append(f"  vs bound     {h(rep['flops_per_token_analytic'])} FLOPs/token analytic (matmul), ratio "
                 f"{rep['ratio']:.4f} (compiled includes elementwise, ~{h(rep['flops_per_token_elementwise_estimate'])})")
  m = rep['memory_per_chip']
  mem_line = (f"  HBM needed   {hb(m['total'])} = arguments {hb(m['argument'])} + outputs {hb(m['output'])} "
              f"- aliased {hb(m['alias'])} + temporaries {hb(m['temp'])} + code {hb(m['generated_code'])}")
  if 'fit' in rep:
    f = rep['fit']
    how = (f"{hb(f['headroom_bytes'])} to spare" if f['fits'] else
           f"{f['need_over_hbm']:.3g}x the chip's HBM, {hb(-f['headroom_bytes'])} over")
    mem_line += f" of {hb(f['hbm_bytes'])}: {f['verdict'].upper()} ({how})"
  lines.append(mem_line)
  tc = rep.get('temp_check')
  if tc:
    lines.append(f"  temporaries  {hb(tc['temp_minus_artefact'])} per device beyond the CPU bf16 table copy "
                 f"({hb(rep['temp_cpu_bf16_table_copy_per_device'])}) = {tc['ratio']:.3g}x the touched experts' "
                 f"training state {hb(tc['touched_expert_state'])} ({'within' if tc['ok'] else 'above'} "
                 f"{tc['factor']:g}x)")
  cb = rep['collective_bytes_per_chip']
  kinds = ', '.join(f'{k} {hb(v)}' for k, v in cb.items() if k != 'total' and v)
  lines.append(f"  collectives  {hb(cb['total'])} per chip per step" + (f" ({kinds})" if kinds else ''))
  if 'latency' in rep:
    from litejax.perf import latency
    lines.append('  ' + latency.format_estimate(rep['latency']))
  return lines


# The TPU compiler refuses a program that cannot fit: "... the total memory required for HLO
# temporaries (231.72T) exceeds available HBM (95.74G)". Sizes are binary (XLA's HumanReadableNumBytes).
_OOM_RE = re.compile(r'memory required for ([\w ]+?) \(([\d.]+)([KMGTPE]?)\) exceeds available HBM '
                     r'\(([\d.]+)([KMGTPE]?)\)')
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40, 'P': 2 ** 50, 'E': 2 ** 60}


def parse_out_of_memory(message: str) -> dict | None:
  """{'what', 'required_bytes', 'available_bytes'} from a TPU compiler RESOURCE_EXHAUSTED message."""
  m = _OOM_RE.search(message)
  if not m:
    return None
  return {'what': m.group(1), 'required_bytes': float(m.group(2)) * _UNITS[m.group(3)],
          'available_bytes': float(m.group(4)) * _UNITS[m.group(5)]}


def compile_report(cfg, target: Target, *, train: bool = False, global_batch: int | None = None,
                   chip: hardware.Chip | None = None) -> dict:
  """Compile one step for `target` and return its per_chip_report.

  When the TPU compiler refuses the program for lack of HBM, the report still comes back: verdict
  'does not fit' from the compiler's own figures, HBM per chip from the sharded parameter (and
  optimizer) state, FLOPs and all-to-all bytes from litejax.model.bounds / litejax.hlo.collectives (analytic).
  """
  from litejax.analysis import bound as bound_report
  cfg, mesh = target_mesh(cfg, target)
  try:
    prog = bound_report.compile_program(cfg, train=train, mesh=mesh, global_batch=global_batch)
  except Exception as e:  # jax.errors.JaxRuntimeError
    oom = parse_out_of_memory(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or oom is None:
      raise
    return _refused_report(cfg, target, mesh, train, global_batch, oom, chip or target.chip)
  return per_chip_report(prog, target, chip)


def _refused_report(cfg, target: Target, mesh, train: bool, global_batch: int | None, oom: dict,
                    chip: hardware.Chip) -> dict:
  from litejax.model import bounds
  from litejax.model.moe import buffer_plan
  from litejax.perf import latency
  from litejax import sharding
  from litejax.analysis.footprint import state_bytes_per_device
  sizes = sharding.mesh_sizes(mesh)
  b = global_batch or sizes['data'] * sizes['expert']
  tokens = b * cfg.model.seq_len
  n_group = tokens // (sizes['data'] * sizes['expert'])
  dpc = target.devices_per_chip
  state = state_bytes_per_device(cfg, sizes, train)
  mult = bounds.BWD_MULTIPLIER if train else 1
  flops_token = sum(bounds.forward_flops_per_token(cfg, n_group).values()) * mult
  flops_chip = flops_token * tokens / target.chips
  a2a = 0.0
  if sizes['expert'] > 1 and cfg.model.num_moe_layers:
    dt = units.dtype_bytes(cfg.model.dtype)
    per_layer = buffer_plan.analytic_all_to_all_bytes_per_rank(cfg, tokens, sizes, dt)['total']
    a2a = float(per_layer * cfg.model.num_moe_layers * (2 if train else 1)) * dpc
  args = state['state'] * dpc
  # HBM traffic lower bound: dense weights once, plus one expert's weights per routed assignment
  # that lands here (capacity_factor·N·K per MoE layer), never more than the experts held.
  pc = bounds.param_counts(cfg)
  pbytes = units.dtype_bytes(cfg.model.param_dtype)
  held = state['params'] * dpc
  assignments = cfg.moe.capacity_factor * n_group * cfg.moe.k_active * cfg.model.num_moe_layers * dpc
  touched = min(held, (pc.total - pc.expert_total) * pbytes + assignments * bounds.expert_params(cfg) * pbytes)
  temps = oom['required_bytes'] * dpc if 'temporar' in oom['what'] else 0.0
  need = args + temps if temps else max(args, oom['required_bytes'] * dpc)
  out = {
      'target': target.spec, 'generation': target.generation, 'chips': target.chips,
      'devices': len(target.devices), 'devices_per_chip': dpc, 'global_batch': b,
      'seq_len': cfg.model.seq_len, 'train': train,
      'compiled': False,
      'compiler_refused': f"{oom['what']} need {units.si(oom['required_bytes'], 'B')} per device, "
                          f"HBM {units.si(oom['available_bytes'], 'B')}",
      'flops_per_step_per_chip': flops_chip, 'flops_per_token': flops_token,
      'flops_per_token_analytic': flops_token, 'ratio': None,      # nothing compiled to compare
      'flops_method': 'analytic (litejax.model.bounds; the compiler refused the program)',
      'bytes_accessed_per_step_per_chip': touched * (mult if train else 1),
      'bytes_method': 'analytic: dense weights + one expert per routed assignment (capacity_factor*N*K*L)',
      'memory_per_chip': {'argument': args, 'output': 0, 'alias': 0, 'generated_code': 0,
                          'temp': temps,
                          'total': need, 'parameters': state['params'] * dpc,
                          'optimizer': state['optimizer'] * dpc},
      'collective_bytes_per_chip': {'all_to_all': a2a, 'total': a2a},
      'unknown_trip_counts': 0,
  }
  if chip is not None:
    out['chip'] = chip.as_dict()
    out['fit'] = verdict(need, chip.hbm_bytes)
    est = latency.estimate(flops_chip, a2a, out['bytes_accessed_per_step_per_chip'], chip)
    out['latency'] = est.as_dict()
    out['tokens_per_s'] = tokens / est.total_s if est.total_s else None
  return out
