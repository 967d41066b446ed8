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
A TPU target (`--target v5p:8x8x8`) compiles for that slice (`target_report`); its FLOPs and bytes
are the TPU compiler's cost_analysis(), extrapolated over depth from unscanned 1- and 2-period compiles
of the same step (litejax.analysis.core.over_depth). cost_analysis counts every FLOP, so beside the
matmul bound it sits above 1 by the step's non-matmul work (configs/tiny.yaml on v5p:2x2x1: 1.13, the
sampler's vocabulary sort and random bits, the KV-cache write as a select over the whole cache, the
dropless dispatch's index work, softmaxes); the verdict judges the step's matmul FLOPs, its dots as
the walker reads them in the TPU HLO (`matmul`), which equal the bound (tests/test_decode_cost.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from litejax import units
from litejax.model import bounds
from litejax.analysis import bound, core
from litejax.inference import decode
from litejax.perf import chips, latency


@dataclasses.dataclass
class DecodeProgram:
  """One compiled decode step and what is needed to read it per token."""
  prog: bound.CompiledProgram      # seq_len 1, global_batch = batch, cfg = the decode (dropless) config
  cache_len: int
  params_cfg: object              # the config as given (param counts)

  @property
  def batch(self) -> int:
    return self.prog.global_batch


def compile_step(cfg, *, batch: int, cache_len: int, mesh) -> DecodeProgram:
  """Lowers and compiles the decode step from abstract arguments on `mesh` (any devices, TPU too)."""
  rt = decode.make_runtime(cfg, mesh, batch, cache_len)
  compiled, signatures, seconds = bound.compile_traced(rt.step, rt.abstract_step_args(), mesh)
  prog = bound.CompiledProgram(compiled, compiled.as_text(), decode.decode_config(cfg), mesh, False, batch, 1,
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


# ------------------------------------------------------------------------------------------ report

def analytic_per_token(cfg, mesh, batch: int, cache_len: int) -> dict[str, float]:
  """The decode bound per token by component, with the rows and router visits of the path that runs."""
  return bounds.decode_flops_per_token(cfg, cache_len, expert_rows_per_token(cfg, mesh, batch),
                                       router_visits_per_token(cfg, mesh, batch))


def expert_slice_bytes_per_token(cfg, mesh, batch: int) -> float:
  """Bytes of the expert rows one token's step reads (the rows of the path that runs, every MoE layer,
  in the parameter dtype): what the decode step asks of the expert tables."""
  return (cfg.model.num_moe_layers * expert_rows_per_token(cfg, mesh, batch) * bounds.expert_params(cfg) *
          units.dtype_bytes(cfg.model.param_dtype))


def report(dp: DecodeProgram, chip: chips.Chip | None = None, tol: float = 0.03) -> dict:
  """Per generated token, compiled vs analytic (the `litejax bound --decode --json` object): the keys
  of litejax.analysis.core's report plus decode, batch, cache_len, the expert-table bytes and the
  latency split. XLA:CPU's bf16 upcast of a scanned table is a named backend artefact
  (litejax.hlo.expert_reads), not a violation: what the step asks for is the rest."""
  from litejax.hlo import flops as hlo_flops
  from litejax.hlo.expert_reads import expert_table_reads
  prog, cfg = dp.prog, dp.params_cfg
  walked = hlo_flops.walk(prog.hlo_text, bounds.COMPONENTS, prog.signatures, prog.num_devices)
  per_tok = prog.num_devices / prog.tokens
  rows = expert_rows_per_token(cfg, prog.mesh, dp.batch)
  shared = core.walked_report(prog, walked, analytic_per_token(cfg, prog.mesh, dp.batch, dp.cache_len),
                              sum(bounds.decode_flops_per_token(cfg, dp.cache_len).values()), tol)
  expert_bytes = bounds.expert_params(cfg) * units.dtype_bytes(cfg.model.param_dtype)
  n_moe = cfg.model.num_moe_layers
  reads = expert_table_reads(prog.hlo_text)
  out = {'decode': True, 'batch': dp.batch, 'cache_len': dp.cache_len, **shared,
         'expert_weight_bytes_per_token': reads['total'] * per_tok,
         'expert_weight_bytes_per_token_cpu_bf16_upcast': reads['cpu_bf16_upcast'] * per_tok,
         'expert_weight_bytes_per_token_analytic': expert_slice_bytes_per_token(cfg, prog.mesh, dp.batch),
         'expert_weight_bytes_all_experts': float(n_moe * cfg.moe.experts_total * expert_bytes),
         'expert_rows_per_token': rows}
  out['expert_weight_bytes_per_token_without_artefacts'] = (out['expert_weight_bytes_per_token'] -
                                                            out['expert_weight_bytes_per_token_cpu_bf16_upcast'])
  if reads['cpu_bf16_upcast']:
    out['artefacts_per_token']['cpu_bf16_expert_table_upcast_bytes'] = out['expert_weight_bytes_per_token_cpu_bf16_upcast']
  out['violations'] = core.violations(out, tol)
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
  cfg, mesh = bound.make_mesh_for(cfg, num_devices)
  s = sharding.mesh_sizes(mesh)
  return report(compile_step(cfg, batch=batch or s['data'] * s['expert'], cache_len=cache_len, mesh=mesh),
                chip, tol)


# ------------------------------------------------------------------------------------------ TPU targets

def target_report(cfg, target, *, batch: int | None, cache_len: int, tol: float = 0.03) -> dict:
  """`litejax bound --decode --target TOPOLOGY` for a TPU slice: the decode step's per-chip FLOPs, bytes
  and collectives per step from the TPU compiler's cost_analysis(), extrapolated over depth
  (core.over_depth), per token beside `bounds.decode_flops_per_token`, and the latency model's terms on
  that chip. `matmul` holds the step's dots (the walker on the same shallow compiles, extrapolated
  alike) beside the bound, and the non-matmul rest of cost_analysis; the verdict judges it against
  `tol`. The full-depth step is compiled too, for its memory; when the compiler refuses it for lack of
  HBM that is reported, and when it refuses even one layer period the figures are analytic."""
  from litejax.hlo import collectives, flops as hlo_flops
  from litejax import sharding
  from litejax.analysis import targets
  cfg, mesh = targets.target_mesh(cfg, target)
  s = sharding.mesh_sizes(mesh)
  b = batch or s['data'] * s['expert']
  periods = cfg.model.num_layers // max(cfg.model.moe_every, 1)
  out = {'decode': True, 'batch': b, 'cache_len': cache_len, 'target': target.spec,
         'generation': target.generation, 'chips': target.chips, 'devices': len(target.devices),
         'mesh': s, 'global_batch': b, 'seq_len': 1, 'train': False}

  def figures(c) -> dict:
    p = compile_step(c, batch=b, cache_len=cache_len, mesh=mesh).prog
    ca = p.compiled.cost_analysis()
    dots = hlo_flops.walk(p.hlo_text, bounds.COMPONENTS, p.signatures, p.num_devices).flops
    return {'flops': float(ca.get('flops', 0.0)), 'bytes': float(ca.get('bytes accessed', 0.0)),
            'collectives': float(collectives.collective_bytes(p.hlo_text)['total']), 'dots': dict(dots)}

  dev, refusal = core.compile_or_refusal(lambda: core.over_depth(figures, cfg, periods))
  if dev is not None:
    out['flops_method'] = f'cost_analysis extrapolated over depth (1 and 2 periods, x{periods} periods)'
    full, refusal = core.compile_or_refusal(lambda: compile_step(cfg, batch=b, cache_len=cache_len, mesh=mesh))
    if full is not None:
      out['memory_bytes_per_device'] = {k: v for k, v in core.memory_per_device(full.prog.compiled).items()
                                        if k in core.MEMORY_PARTS}
  if refusal is not None:
    out['compiler_refused'] = refusal['message']
  if dev is None:
    dev = analytic_step_per_device(cfg, mesh, b, cache_len)
    out['flops_method'] = 'analytic (litejax.model.bounds; the TPU compiler refused even one layer)'
  analytic = analytic_per_token(cfg, mesh, b, cache_len)
  per_tok = len(target.devices) / b
  dpc = target.devices_per_chip
  pc = bounds.param_counts(cfg)
  out.update({
      'flops_per_token_analytic': sum(analytic.values()),
      'flops_per_token_compiled': dev['flops'] * per_tok,
      'ratio': dev['flops'] * per_tok / sum(analytic.values()),
      'analytic_by_component': analytic,
      'bytes_accessed_per_token': dev['bytes'] * per_tok,
      'expert_weight_bytes_per_token_analytic': expert_slice_bytes_per_token(cfg, mesh, b),
      'collective_bytes_per_rank': dev['collectives'],
      'params_total': pc.total,
      'params_active_per_token': pc.active_per_token,
      'chip': target.chip.as_dict(),
      'latency': predict(target.chip, flops=dev['flops'] * dpc, collective_bytes=dev['collectives'] * dpc,
                         bytes_accessed=dev['bytes'] * dpc),
      'tol': tol,
  })
  if 'dots' in dev:   # compiled: the matmul work is judged; analytic figures have nothing to judge
    out['matmul'] = core.matmul_block(analytic, {c: v * per_tok for c, v in dev['dots'].items()})
    out['matmul']['flops_per_token_non_matmul'] = out['flops_per_token_compiled'] - out['matmul']['flops_per_token_compiled']
  out['violations'] = core.violations(out['matmul'], tol) if 'matmul' in out else []
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
  flops = sum(analytic_per_token(cfg, mesh, batch, cache_len).values()) * batch / devices
  pc = bounds.param_counts(cfg)
  dense = (pc.active_per_token - pc.expert_active_per_token) * pbytes / s['tensor']
  experts = expert_slice_bytes_per_token(cfg, mesh, batch) * batch / devices
  kv = mc.num_layers * cache_len * bounds.kv_cache_values_per_token(mc) * abytes * batch / devices
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
