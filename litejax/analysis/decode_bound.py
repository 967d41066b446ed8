"""The decode step's cost per generated token: compiled from abstract shapes, read like `litejax bound`.

`compile_step` lowers litejax.inference.decode's step for (batch, cache_len) from ShapeDtypeStructs, so no
parameter or cache is allocated (configs/quadrillion.yaml compiles on a laptop). `report` walks the
optimized HLO with litejax.hlo.flops (loops × trip counts: XLA's cost_analysis counts a scan body
once) and sets it beside `bounds.decode_flops_per_token`:
  FLOPs       by component, compiled vs analytic (attention over the cache, K experts' rows, the
              router's kept branches, unembedding), with the `litejax bound` violation rule;
  bytes       the walker's bytes accessed, and apart the bytes read from the expert weight tables
              (operands traced to those parameters by litejax.hlo.weights): the active experts'
              slices, to compare with K·expert bytes per token and with every expert's bytes;
  collectives compiled bytes per rank by kind, and the expert-parallel all-to-all analytic volume;
  latency     the model's compute / communication / memory terms per step (= per generated token of
              each row) and the dominant one, through `predict`, this module's one call of the
              latency model.
A TPU target (`--target v5p:8x8x8`) compiles for that slice; its FLOPs and bytes are the TPU
compiler's cost_analysis(), extrapolated over depth from unscanned 1- and 2-period compiles of the
same step (the walker does not price the TPU's convolution lowering of dots).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from litejax import units
from litejax.model import bounds
from litejax.analysis import bound as cost
from litejax.inference import decode
from litejax.perf import chips, latency


@dataclasses.dataclass
class DecodeProgram:
  """One compiled decode step and what is needed to read it per token."""
  prog: cost.CompiledProgram      # seq_len 1, global_batch = batch, cfg = the decode (dropless) config
  cache_len: int
  params_cfg: object              # the config as given (param counts)

  @property
  def batch(self) -> int:
    return self.prog.global_batch


def compile_step(cfg, *, batch: int, cache_len: int, mesh) -> DecodeProgram:
  """Lowers and compiles the decode step from abstract arguments on `mesh` (any devices, TPU too)."""
  import jax
  from litejax.hlo.scopes import dot_signatures
  rt = decode.make_runtime(cfg, mesh, batch, cache_len)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    traced = rt.step.trace(*rt.abstract_step_args())
    signatures = dot_signatures(traced.jaxpr, bounds.COMPONENTS)
    compiled = traced.lower().compile(compiler_options=cost._ANALYSIS_COMPILER_OPTIONS)
  seconds = time.perf_counter() - t0
  prog = cost.CompiledProgram(compiled, compiled.as_text(), decode.decode_config(cfg), mesh, False, batch, 1,
                              seconds, mesh.size > 1, signatures)
  return DecodeProgram(prog, cache_len, cfg)


def expert_rows_per_token(cfg, mesh, batch: int) -> float:
  """Expert rows computed per token by the dropless path that runs: one device, the CPU tiles
  (config.dropless_tiles; K at a few tokens per step); a mesh, the expert-parallel plan's slots
  (every rank packs N_loc·K slots for each of R_EP ranks: R_EP·K rows per token)."""
  from litejax.model.moe import buffer_plan
  from litejax import sharding
  from litejax.model.moe.capacity import dropless_tiles
  m = cfg.moe
  s = sharding.mesh_sizes(mesh)
  n_local = batch // (s['data'] * s['expert'])
  if mesh.size == 1:
    tile, tiles = dropless_tiles(n_local * m.k_active, m.experts_total)
    return tile * tiles / n_local
  p = buffer_plan.plan(decode.decode_config(cfg).moe, n_local, s['expert'])
  return p.total_slots * (m.k_expert if p.aligned else 1) / n_local


def router_visits_per_token(cfg, mesh, batch: int) -> float | None:
  """(token, kept group) visits scored at the expert level per token where router_expert is split by
  group over the expert ranks (litejax.model.moe.router_parallel): at decode nothing may drop, so every rank sends
  each of the R_EP owners room for all its N_loc·k_tier·k_group visits, R_EP·k_tier·k_group per token,
  the router's analogue of the experts' R_EP·K rows. None where the table is not split."""
  from litejax.model.moe import buffer_plan
  from litejax import sharding
  s = sharding.mesh_sizes(mesh)
  if not sharding.router_expert_split(cfg.moe, s['expert']):
    return None
  n_local = batch // (s['data'] * s['expert'])
  return s['expert'] * buffer_plan.router_slots_per_rank(decode.decode_config(cfg).moe, n_local, s['expert']) / n_local


def predict(chip: chips.Chip, *, compiled=None, flops: float | None = None,
            collective_bytes: float | None = None, bytes_accessed: float | None = None) -> dict:
  """The latency model's step time for one chip's share of a decode step: the one place the decode
  prediction is made (`bound --decode`, `generate --json`, bench_decode). Terms in seconds, the
  dominant term, kernels, and predicted_ms_per_token (a decode step gives every row one token).
  The host term is the decode loop's calls per step (decode.HOST_CALLS_PER_STEP) × the chip's
  call_overhead_s (measured on a CPU host; 0 on the TPU chips, not modelled).

  With `compiled` (the step's program on one device): latency.estimate_compiled, i.e. kernels
  executed (scan bodies × trip count) × chip.kernel_overhead_s and the transpose-bandwidth memory
  term included; flops / bytes_accessed, when given, replace its own figures. Without (a TPU slice
  whose figures are extrapolated or analytic): latency.estimate on the three figures."""
  if compiled is not None:
    est = latency.estimate_compiled(compiled, chip, flops=flops, bytes_accessed=bytes_accessed,
                                    host_calls=decode.HOST_CALLS_PER_STEP)
  else:
    est = latency.estimate(flops or 0.0, collective_bytes or 0.0, bytes_accessed or 0.0, chip,
                           host_calls=decode.HOST_CALLS_PER_STEP).as_dict()
  return {**est, 'predicted_ms_per_token': 1e3 * est['total_s']}


def expert_weight_bytes(hlo_text: str) -> float:
  """Bytes one execution reads from the routed experts' weight tables (per device): see
  `expert_weight_reads` (its 'total')."""
  return expert_weight_reads(hlo_text)['total']


def expert_weight_reads(hlo_text: str) -> dict[str, float]:
  """Bytes one execution reads from the routed experts' weight tables (per device), split by cause.

  total   counted where a table is read directly (reached from its entry parameter without a slice):
          a slice or gather of it reads the slices (hlo_cost's rule, also for a fusion whose parameter
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
  from litejax.hlo import parse as hlo, flops as hlo_flops
  from litejax.hlo.weights import WeightOrigins, component_of_weight, unescape
  module = hlo.parse(hlo_text)
  origins = WeightOrigins(module)

  def table_path(comp, name, through_slices=False):
    path = origins.origin(comp, name, through_slices=through_slices)
    return bool(path) and component_of_weight(unescape(path), origins.entry_paths) == 'experts'

  upcasts = _entry_upcasts(module, table_path)
  total = upcast = 0.0
  for name, times in module.multiplicities(control_flow_only=True).items():
    comp = module[name]
    for ins in comp.instrs.values():
      if ins.opcode in hlo_flops.NO_BYTES or not ins.operands:
        continue
      if ins.opcode in hlo_flops.SLICING:
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
        sliced = hlo_flops.slice_reads(called, p.name) if p is not None else None
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
  from litejax.hlo.artefacts import NARROW_FLOATS
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


# ------------------------------------------------------------------------------------------ report

def report(dp: DecodeProgram, chip: chips.Chip | None = None, tol: float = 0.03) -> dict:
  """Per generated token, compiled vs analytic (the `litejax bound --decode --json` object): the keys
  of `litejax bound` plus decode, batch, cache_len, the expert-table bytes and the latency split."""
  from litejax.hlo import flops as hlo_flops
  from litejax import sharding
  prog, cfg = dp.prog, dp.params_cfg
  walked = hlo_flops.walk(prog.hlo_text, bounds.COMPONENTS, prog.signatures, prog.num_devices)
  per_tok = prog.num_devices / prog.tokens
  rows = expert_rows_per_token(cfg, prog.mesh, dp.batch)
  analytic = bounds.decode_flops_per_token(cfg, dp.cache_len, rows,
                                           router_visits_per_token(cfg, prog.mesh, dp.batch))
  by = {}
  for c in bounds.COMPONENTS:
    a, k = analytic[c], walked.flops.get(c, 0.0) * per_tok
    by[c] = {'analytic': a, 'compiled': k, 'ratio': (k / a) if a else (1.0 if k == 0 else float('inf'))}
  other = walked.flops.get('other', 0.0) * per_tok
  by['other'] = {'analytic': 0.0, 'compiled': other, 'ratio': 1.0 if other == 0 else float('inf')}
  fa, fk = sum(analytic.values()), walked.dot_flops * per_tok
  params = bounds.param_counts(cfg)
  ca = prog.compiled.cost_analysis()
  coll = cost._collectives(prog, walked)
  pbytes = units.dtype_bytes(cfg.model.param_dtype)
  expert_bytes = bounds.expert_params(cfg) * pbytes
  n_moe = cfg.model.num_moe_layers
  reads = expert_weight_reads(prog.hlo_text)
  out = {
      'decode': True, 'batch': dp.batch, 'cache_len': dp.cache_len,
      'flops_per_token_analytic': fa, 'flops_per_token_compiled': fk, 'ratio': fk / fa,
      'by_component': by,
      'flops_per_token_analytic_unpadded': sum(bounds.decode_flops_per_token(cfg, dp.cache_len).values()),
      'flops_per_token_compiled_with_elementwise': walked.useful_flops * per_tok,
      'flops_per_token_xla_cost_analysis': float(ca.get('flops', 0.0)) * per_tok,
      'artefacts_per_token': {k: v * per_tok for k, v in walked.artefacts.items()},
      'bytes_accessed_per_token_xla': float(ca.get('bytes accessed', 0.0)) * per_tok,
      'bytes_accessed_per_token': walked.bytes_accessed * per_tok,
      'expert_weight_bytes_per_token': reads['total'] * per_tok,
      'expert_weight_bytes_per_token_cpu_bf16_upcast': reads['cpu_bf16_upcast'] * per_tok,
      'expert_weight_bytes_per_token_analytic': n_moe * rows * expert_bytes,   # the rows' slices
      'expert_weight_bytes_all_experts': float(n_moe * cfg.moe.experts_total * expert_bytes),
      'expert_rows_per_token': rows,
      'unknown_trip_counts': walked.unknown_trip_counts,
      'params_total': params.total, 'params_active_per_token': params.active_per_token,
      'params_expert_active_per_token': params.expert_active_per_token,
      'collective_bytes_per_rank': coll['compiled_all_to_all'],
      'collective_bytes_per_rank_analytic': coll['analytic']['total'],
      'collective_bytes_per_rank_analytic_by_buffer': coll['analytic'],
      'collective_bytes_per_rank_by_kind': coll['by_kind'],
      'collective_bytes_per_rank_all_kinds': coll['by_kind'].get('total', 0.0),
      'collective_bytes_per_rank_other_kinds': coll['other'],
      'collective_bytes_per_rank_cpu_bf16_upcast': coll['upcast'],
      'collective_notes': coll['notes'],
      'dispatch': cost.resolve_dispatch_for(prog), 'compile_seconds': prog.compile_seconds,
      'train': False, 'devices': prog.num_devices, 'mesh': sharding.mesh_sizes(prog.mesh),
      'global_batch': dp.batch, 'seq_len': 1, 'tokens_per_group': prog.tokens_per_group,
      'memory_bytes_per_device': cost._memory(prog.compiled.memory_analysis()),
      'spec_formula': bounds.spec_formula(cfg), 'tol': tol,
  }
  out['violations'] = cost.violations(out, tol)
  # XLA:CPU's bf16 upcast of a scanned table is a named backend artefact (expert_weight_reads), not a
  # violation: what the step asks for is the rest.
  read = out['expert_weight_bytes_per_token'] - out['expert_weight_bytes_per_token_cpu_bf16_upcast']
  out['expert_weight_bytes_per_token_without_artefacts'] = read
  if reads['cpu_bf16_upcast']:
    out['artefacts_per_token']['cpu_bf16_expert_table_upcast_bytes'] = out['expert_weight_bytes_per_token_cpu_bf16_upcast']
  if read > (1 + tol) * out['expert_weight_bytes_per_token_analytic']:
    out['violations'].append(
        f"expert weights read {read:.4g} B/token exceed the active rows' "
        f"slices {out['expert_weight_bytes_per_token_analytic']:.4g} B/token by more than {tol:.0%}")
  if chip is not None:
    out['chip'] = chip.as_dict()
    # One chip = one device here (CPU host, or a TPU device per chip): per-device figures per step.
    out['latency'] = predict(chip, compiled=prog.compiled, flops=walked.useful_flops,
                             bytes_accessed=walked.bytes_accessed)
  return out


def bound_decode(cfg, *, batch: int | None, cache_len: int, num_devices: int | None = None,
                 chip: chips.Chip | None = None, tol: float = 0.03) -> dict:
  """`litejax bound --decode` on an emulated CPU mesh: compile the step, report per token."""
  from litejax import sharding
  cfg, mesh = cost.make_mesh_for(cfg, num_devices)
  s = sharding.mesh_sizes(mesh)
  return report(compile_step(cfg, batch=batch or s['data'] * s['expert'], cache_len=cache_len, mesh=mesh),
                chip, tol)


# ------------------------------------------------------------------------------------------ TPU targets

def _shallow(cfg, periods: int):
  period = max(cfg.model.moe_every, 1)
  return cfg.replace(model=dataclasses.replace(cfg.model, num_layers=periods * period, scan_layers=False))


def target_report(cfg, target, *, batch: int | None, cache_len: int) -> dict:
  """`litejax bound --decode --target TOPOLOGY` for a TPU slice: the decode step's per-chip FLOPs,
  bytes and collectives per step from the TPU compiler's cost_analysis(), extrapolated over depth
  (unscanned compiles of one and two layer periods: cost = a + b·periods), per token beside
  `bounds.decode_flops_per_token`, and the latency model's terms on that chip. The full-depth step
  is compiled too, for its memory; when the compiler refuses it for lack of HBM that is reported."""
  from litejax.hlo import collectives
  from litejax import sharding
  from litejax.analysis import targets
  cfg, mesh = targets.target_mesh(cfg, target)
  s = sharding.mesh_sizes(mesh)
  b = batch or s['data'] * s['expert']
  periods = cfg.model.num_layers // max(cfg.model.moe_every, 1)
  out = {'decode': True, 'batch': b, 'cache_len': cache_len, 'target': target.spec,
         'generation': target.generation, 'chips': target.chips, 'devices': len(target.devices),
         'mesh': s, 'global_batch': b, 'seq_len': 1, 'train': False}
  try:
    shallow = []
    for n in (1, 2):
      p = compile_step(_shallow(cfg, n), batch=b, cache_len=cache_len, mesh=mesh).prog
      ca = p.compiled.cost_analysis()
      shallow.append({'flops': float(ca.get('flops', 0.0)), 'bytes': float(ca.get('bytes accessed', 0.0)),
                      'collectives': float(collectives.collective_bytes(p.hlo_text)['total'])})
    dev = {k: shallow[0][k] + (shallow[1][k] - shallow[0][k]) * (periods - 1) for k in shallow[0]}
    out['flops_method'] = f'cost_analysis extrapolated over depth (1 and 2 periods, x{periods} periods)'
    full = compile_step(cfg, batch=b, cache_len=cache_len, mesh=mesh).prog
    out['memory_bytes_per_device'] = cost._memory(full.compiled.memory_analysis())
  except Exception as e:  # jax.errors.JaxRuntimeError: the TPU compiler refuses what cannot fit
    oom = targets.parse_out_of_memory(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or oom is None:
      raise
    out['compiler_refused'] = (f"{oom['what']} need {units.si(oom['required_bytes'], 'B')} per device, "
                               f"HBM {units.si(oom['available_bytes'], 'B')}")
    if 'flops_method' not in out:
      dev = analytic_step_per_device(cfg, mesh, b, cache_len)
      out['flops_method'] = 'analytic (litejax.model.bounds; the TPU compiler refused even one layer)'
  rows = expert_rows_per_token(cfg, mesh, b)
  analytic = bounds.decode_flops_per_token(cfg, cache_len, rows, router_visits_per_token(cfg, mesh, b))
  per_tok = len(target.devices) / b
  dpc = target.devices_per_chip
  out.update({
      'flops_per_token_analytic': sum(analytic.values()),
      'flops_per_token_compiled': dev['flops'] * per_tok,
      'ratio': dev['flops'] * per_tok / sum(analytic.values()),
      'analytic_by_component': analytic,
      'bytes_accessed_per_token': dev['bytes'] * per_tok,
      'expert_weight_bytes_per_token_analytic': cfg.model.num_moe_layers * rows * bounds.expert_params(cfg) *
                                                units.dtype_bytes(cfg.model.param_dtype),
      'collective_bytes_per_rank': dev['collectives'],
      'params_total': bounds.param_counts(cfg).total,
      'params_active_per_token': bounds.param_counts(cfg).active_per_token,
      'chip': target.chip.as_dict(),
      'latency': predict(target.chip, flops=dev['flops'] * dpc, collective_bytes=dev['collectives'] * dpc,
                         bytes_accessed=dev['bytes'] * dpc),
      'violations': [],
  })
  return out


def analytic_step_per_device(cfg, mesh, batch: int, cache_len: int) -> dict[str, float]:
  """One device's decode step from the analytic model, for when the compiler refuses the program:
  FLOPs = the decode bound × its tokens; bytes = its dense weights (replicated over batch ranks, split
  over tensor) + the expert rows' slices landing on it + its rows' KV cache; collectives = the
  expert-parallel all-to-alls (litejax.model.moe.buffer_plan) of every MoE layer."""
  from litejax.model.moe import buffer_plan
  from litejax import sharding
  s = sharding.mesh_sizes(mesh)
  devices = mesh.size
  mc, n_moe = cfg.model, cfg.model.num_moe_layers
  pbytes = units.dtype_bytes(mc.param_dtype)
  abytes = units.dtype_bytes(mc.dtype)
  rows = expert_rows_per_token(cfg, mesh, batch)
  flops = sum(bounds.decode_flops_per_token(cfg, cache_len, rows, router_visits_per_token(cfg, mesh, batch)
                                            ).values()) * batch / devices
  pc = bounds.param_counts(cfg)
  dense = (pc.active_per_token - pc.expert_active_per_token) * pbytes / s['tensor']
  experts = n_moe * rows * bounds.expert_params(cfg) * pbytes * batch / devices
  kv = mc.num_layers * 2 * cache_len * mc.num_kv_heads * mc.resolved_head_dim * abytes * batch / devices
  coll = 0.0
  if s['expert'] > 1 and n_moe:
    coll = float(buffer_plan.analytic_all_to_all_bytes_per_rank(cfg, batch, s, abytes)['total'] * n_moe)
  return {'flops': flops, 'bytes': dense + experts + kv, 'collectives': coll}


def runtime_latency_split(rt, chip) -> dict[str, Any]:
  """The latency model's compute / communication / memory terms for one decode step of this runtime
  (litejax.analysis.decode_bound: the step compiled from abstract shapes, loops counted by trip count) and
  predicted_ms_per_token. Per step = per generated token of every row."""
  dp = compile_step(rt.cfg, batch=rt.batch, cache_len=rt.max_len, mesh=rt.mesh)
  rep = report(dp, chip)
  return {**rep['latency'], 'flops': rep['flops_per_token_compiled_with_elementwise'] * rt.batch / rt.mesh.size,
          'bytes_accessed': rep['bytes_accessed_per_token'] * rt.batch / rt.mesh.size,
          'collective_bytes': rep['collective_bytes_per_rank_all_kinds']}
