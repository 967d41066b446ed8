"""Compile a config from abstract inputs and check its compiled FLOPs against the analytic bound.

`compile_program` lowers and compiles a forward pass or a whole training step without allocating
anything; `report` reads the optimized HLO with litejax.hlo.flops (FLOPs by component, bytes,
collectives; loops counted by litejax.hlo.parse's trip-count rule) and sets it beside litejax.model.bounds'
analytic figures (the `litejax bound --json` object), and `violations` says whether the whole
program is within the bound: matmul total and each component within tol of the analytic figure,
either way; the elementwise row within ELEMENTWISE_FACTOR of its estimate; a train step's
optimizer update within OPTIMIZER_FACTOR of its cost for the parameters a bounded step touches.
Weight-gradient outer products (the gradient of gathered expert or router slices, lowered by XLA as
multiply + scatter-add into the whole table) are matmul work of the component whose weights they
are, at 2·rows·d·h like any weight-gradient matmul (litejax.hlo.flops, "lowered dot"); they are
listed apart under `lowered_dots_per_token`. So an E-sized dense gradient shows up where it costs:
the whole-table writes and conversions in the elementwise row, the update of every row in the
optimizer row, the table's gradient all-reduce in `all_reduce_bytes_per_rank`, its buffers in
`memory_bytes_per_device.temp`. The HLO readers are re-exported here
(`walk`, `HloCost`, `parse_hlo`, `component_of`, `dot_signatures`) for callers of the old module.
"""
from __future__ import annotations

import dataclasses
import math

from litejax import units
from litejax.model.bounds import COMPONENTS
from litejax.hlo.parse import parse_hlo  # noqa: F401  (re-exported)
from litejax.hlo.flops import HloCost, walk  # noqa: F401  (re-exported)
from litejax.hlo.scopes import component_of, dot_signatures  # noqa: F401  (re-exported)

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


# LLVM's optimization level changes the machine code only: the optimized HLO text and
# memory_analysis() stay the same, and the compile is faster (experiments/analysis_opt_level.py
# checks both).
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
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer
  tx = make_optimizer(cfg.train)
  graphdef, abstract, shardings = train_step.state_layout(cfg, mesh, tx)
  if train:
    program, args = train_step.make_train_step(cfg, graphdef, tx, shardings, tok_sh), (abstract, tokens, tokens)
  else:
    def forward(params, extra, tokens_bs):
      logits_bsv, _ = nnx.merge(graphdef, params, extra)(tokens_bs)
      return logits_bsv

    logits_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tok_sh.spec, None))
    program, args = jax.jit(forward, out_shardings=logits_sh), (abstract['params'], abstract['extra'], tokens)
  from litejax.model import bounds
  with jax.set_mesh(mesh):   # the MoE layers choose expert-parallel dispatch from the mesh
    traced = program.trace(*args)
    signatures = dot_signatures(traced.jaxpr, bounds.COMPONENTS)
    # The executable is never run (its inputs are abstract): only the optimized HLO is read, and the
    # HLO passes run the same whatever LLVM's optimization level (see _ANALYSIS_COMPILER_OPTIONS).
    compiled = traced.lower().compile(compiler_options=_ANALYSIS_COMPILER_OPTIONS)
  seconds = time.perf_counter() - t0
  return CompiledProgram(compiled, compiled.as_text(), cfg, mesh, train, b, s, seconds, mesh.size > 1,
                         signatures)


# ------------------------------------------------------------------------------------------ report

# Scopes the walker attributes to: the model's components and the train step's update.
SCOPES = COMPONENTS + ('optimizer',)
# How far the elementwise row may exceed its estimate (see `violations`). The estimate is rough
# (norms, softmaxes, activations, router scores; not the loss or index arithmetic): the shipped
# tiny configs sit at 1.34-1.44x forward and 1.59-1.70x as a train step (8 CPU devices), the small
# shapes of tests/test_cost.py (d = S = 32) higher; a dense gradient of the expert tables is 7x
# (tests/test_bound_whole_program.py's shrunk quadrillion) to 6,800x (configs/quadrillion.yaml).
ELEMENTWISE_FACTOR = 4.0
# AdamW + global-norm clipping in XLA's convention, FLOPs per parameter updated: 11.7 measured on
# the tiny configs' train steps (`litejax bound --train --json`, optimizer.ratio). The estimate is a
# count, not a guess, so its factor is tight: a dense update of tables whose rows mostly got no
# token is several times over it.
OPTIMIZER_FLOPS_PER_PARAM = 12.0
OPTIMIZER_FACTOR = 1.5


def analytic_per_token(cfg, tokens_per_group: int, *, train: bool = False,
                       expert_parallel: bool = False, expert_ranks: int = 1) -> dict[str, float]:
  """The analytic matmul FLOPs per token by component, with the padding of the path that runs.

  Single-device dispatch pads as litejax.model.bounds says. Expert-parallel dispatch (litejax.model.moe.buffer_plan.plan)
  runs `einsum` as `capacity`, and its gather path computes the slots packed per destination rank
  (≈ capacity_factor·K rows per token, not K); a router_expert split by group likewise scores
  ≈ capacity_factor·k_tier·k_group visit slots per token on the groups' owners.
  """
  from litejax.model import bounds
  from litejax.model.moe.capacity import resolve_dispatch
  path = resolve_dispatch(cfg.moe, tokens_per_group)
  if expert_parallel and path == 'einsum':
    path = 'capacity'
  out = bounds.forward_flops_per_token(cfg, tokens_per_group, dispatch=path)
  if expert_parallel and cfg.model.num_moe_layers:
    from litejax.model.moe import buffer_plan
    from litejax import sharding
    p = buffer_plan.plan(cfg.moe, tokens_per_group, expert_ranks)
    rows = p.total_slots * (cfg.moe.k_expert if p.aligned else 1) / tokens_per_group
    out['experts'] = cfg.model.num_moe_layers * rows * bounds.expert_flops(cfg)
    m = cfg.moe
    if sharding.router_expert_split(m, expert_ranks):
      # router_expert split by group: the owners score the visits' slots (litejax.model.moe.router_parallel).
      visits = expert_ranks * buffer_plan.router_slots_per_rank(m, tokens_per_group, expert_ranks)
      out['router_expert'] = cfg.model.num_moe_layers * 2 * cfg.model.d_model * visits * m.experts_per_group / tokens_per_group
  if train:
    out = {k: bounds.BWD_MULTIPLIER * v for k, v in out.items()}
  return out


def _collectives(prog: CompiledProgram, cost: HloCost) -> dict:
  """Collective bytes per rank for the whole program: compiled (as XLA:CPU moves them, and the
  all-to-all at the program's dtypes) and analytic (the expert-parallel all-to-alls).

  The analytic figure (litejax.model.moe.buffer_plan) counts both all-to-alls of every MoE layer's forward pass,
  dispatch out and combine back (+ the expert ids the gather path sends), twice in a training step
  (their transposes). It is compared with the compiled all-to-all bytes only; other kinds (the
  partitioner's all-gathers, gradient all-reduces) are listed beside it, not hidden. XLA:CPU moves
  bf16 all-to-all operands as f32 (a convert just before the collective doubles their bytes): the
  comparable figure counts those at the program's 2 bytes and reports the difference apart.
  """
  from litejax.model.moe import buffer_plan
  from litejax import sharding
  by_kind = dict(cost.collective_bytes)
  upcast = float(cost.collective_upcast_bytes.get('all_to_all', 0.0))
  a2a = by_kind.get('all_to_all', 0.0) - upcast
  analytic = {'dispatch': 0.0, 'combine': 0.0, 'metadata': 0.0, 'router': 0.0, 'total': 0.0}
  s = sharding.mesh_sizes(prog.mesh)
  if prog.expert_parallel and s['expert'] > 1 and prog.cfg.model.num_moe_layers:
    dt = units.dtype_bytes(prog.cfg.model.dtype)
    per_layer = buffer_plan.analytic_all_to_all_bytes_per_rank(prog.cfg, prog.tokens, s, dt)
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
  from litejax.model import bounds
  cfg = prog.cfg
  cost = walk(prog.hlo_text, SCOPES, prog.signatures, prog.num_devices)
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
  elem_k = sum(cost.useful_elementwise(s) for s in cost.elementwise if s != 'optimizer') * per_tok
  by['elementwise'] = {'analytic': elem_a, 'compiled': elem_k, 'ratio': elem_k / elem_a if elem_a else math.inf}
  fa = sum(analytic.values())
  fk = cost.dot_flops * per_tok
  params = bounds.param_counts(cfg)
  ca = prog.compiled.cost_analysis()
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
      'lowered_dots_per_token': {k: v * per_tok for k, v in cost.lowered_dots.items()},
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
      'all_reduce_bytes_per_rank': coll['by_kind'].get('all_reduce', 0.0),
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
      'elementwise_factor': ELEMENTWISE_FACTOR,
      'optimizer_factor': OPTIMIZER_FACTOR,
  }
  if prog.train:
    out['optimizer'] = _optimizer(prog, cost, sizes)
    from litejax.analysis import train_temp
    temp = train_temp.temp_report(prog, out['memory_bytes_per_device'])
    if temp:   # the sparse step: XLA:CPU's bf16 table copy set apart, the rest against the touched rows
      out['memory_bytes_per_device']['temp_cpu_bf16_table_copy'] = temp['temp_cpu_bf16_table_copy']
      out['temp_check'] = temp['check']
  out['violations'] = violations(out, tol)
  return out


def params_touched_per_step(cfg, sizes: dict[str, int], tokens_per_group: int) -> float:
  """Parameters a bounded update touches in one step, summed over devices (the SPMD programs).

  Every device updates its copy of the dense (non-expert, non-router) parameters and of the tier
  and group routers; of its E/expert experts per MoE layer, at most u = min(E/expert, ⌈cf·N·K⌉)
  receive an assignment (the capacity of the assignments arriving at one expert rank), and of the
  expert router table only the rows of the kept groups, min(E, N·k_tier·k_group·E_g) rows of d.
  """
  from litejax.model import bounds
  m, mc = cfg.moe, cfg.model
  devices = math.prod(sizes.values())
  pc = bounds.param_counts(cfg)
  d, n_moe = mc.d_model, mc.num_moe_layers
  routers = (d * m.num_tiers if m.num_tiers > 1 else 0) + (m.num_tiers * d * m.groups_per_tier
                                                           if m.groups_per_tier > 1 else 0)
  router_rows = min(m.experts_total, tokens_per_group * m.k_tier * m.k_group * m.experts_per_group)
  u = min(m.experts_total // sizes['expert'], math.ceil(m.capacity_factor * tokens_per_group * m.k_active))
  per_device = pc.dense + n_moe * (routers + router_rows * d + u * bounds.expert_params(cfg))
  return float(devices * per_device)


def _optimizer(prog: CompiledProgram, cost: HloCost, sizes: dict[str, int]) -> dict:
  """The update's work and traffic (instructions under the train step's 'optimizer' scope) beside
  its estimate: OPTIMIZER_FLOPS_PER_PARAM for every parameter a bounded update touches."""
  per_tok = prog.num_devices / prog.tokens
  touched = params_touched_per_step(prog.cfg, sizes, prog.tokens_per_group)
  flops = (cost.useful_elementwise('optimizer') + cost.flops.get('optimizer', 0.0)) * per_tok
  est = OPTIMIZER_FLOPS_PER_PARAM * touched / prog.tokens
  per_device = cost.bytes_by_scope.get('optimizer', 0.0)
  return {'flops_per_token': flops, 'flops_per_token_estimate': est, 'ratio': flops / est if est else math.inf,
          'params_touched_per_step_estimate': touched,
          'bytes_accessed_per_step_per_device': per_device,
          'bytes_accessed_per_step': per_device * prog.num_devices}


def resolve_dispatch_for(prog: CompiledProgram) -> str:
  """The dispatch path that ran ('none' without MoE layers; expert-parallel runs einsum as capacity)."""
  from litejax.model.moe.capacity import resolve_dispatch
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
  """Why the whole program is not within the bound: one line per reason.

  matmul      the compiled matmul total outside [1 − tol, 1 + tol] × the analytic bound (with
              padding): an undercount is a disagreement too (work the walker cannot see, or a
              bound that does not describe the program);
  component   a component off its analytic figure by more than tol × the total bound, either way,
              so a blow-up in one cannot hide behind slack in another (named when the total is off);
  elementwise the elementwise row (forward + backward, artefacts out) above ELEMENTWISE_FACTOR × its
              estimate (litejax.model.bounds.elementwise_flops_per_token);
  optimizer   the update's FLOPs above OPTIMIZER_FACTOR × OPTIMIZER_FLOPS_PER_PARAM × the
              parameters a bounded step touches (`params_touched_per_step`): a dense update of
              expert tables most of whose rows got no token fails it.
  (A sparse step's temporaries are checked beside these, `temp_check`, not as a violation: train_temp.)
  """
  out = []
  fa, fk = rep['flops_per_token_analytic'], rep['flops_per_token_compiled']
  off = []
  for name, row in rep['by_component'].items():
    if name == 'elementwise':
      continue
    delta = row['compiled'] - row['analytic']
    if abs(delta) > tol * fa:
      off.append((abs(delta), delta, name))
  off.sort(reverse=True)
  named = [f'{n} ({d / fa:+.1%} of the bound)' for _, d, n in off]
  if not (1 - tol) * fa <= fk <= (1 + tol) * fa:
    how = 'exceeds' if fk > fa else 'falls short of'
    out.append(f'matmul: compiled {fk:.4g} FLOPs/token {how} the analytic bound {fa:.4g} by '
               f'{abs(fk / fa - 1):.1%} (> {tol:.0%}): {", ".join(named) or "spread over components"}')
  else:
    for _, d, n in off:
      row = rep['by_component'][n]
      out.append(f'component {n}: compiled {row["compiled"]:.4g} vs analytic {row["analytic"]:.4g}, '
                 f'{d / fa:+.1%} of the bound (> {tol:.0%})')
  el = rep['by_component'].get('elementwise')
  if el and el['analytic'] and el['compiled'] > ELEMENTWISE_FACTOR * el['analytic']:
    out.append(f'elementwise: compiled {el["compiled"]:.4g} FLOPs/token is {el["ratio"]:.4g}x its estimate '
               f'{el["analytic"]:.4g} (> {ELEMENTWISE_FACTOR:g}x)')
  opt = rep.get('optimizer')
  if opt and opt['flops_per_token'] > OPTIMIZER_FACTOR * opt['flops_per_token_estimate']:
    out.append(f'optimizer: the update costs {opt["flops_per_token"]:.4g} FLOPs/token, {opt["ratio"]:.4g}x '
               f'the estimate {opt["flops_per_token_estimate"]:.4g} for the parameters a bounded step '
               f'touches (> {OPTIMIZER_FACTOR:g}x): it updates rows no token reached')
  return out


def bound(cfg, *, train: bool = False, num_devices: int | None = None, global_batch: int | None = None,
          tol: float = 0.03) -> dict:
  """Compile `cfg` from abstract inputs and return its report (see `report`)."""
  return report(compile_program(cfg, train=train, num_devices=num_devices, global_batch=global_batch), tol)
