"""Compile a config from abstract inputs and check its compiled FLOPs against the analytic bound.

`compile_program` lowers and compiles a forward pass or a whole training step without allocating
anything; `report` reads the optimized HLO with litejax.hlo.flops (FLOPs by component, bytes,
collectives; loops counted by litejax.hlo.parse's trip-count rule) and sets it beside litejax.model.bounds'
analytic figures (the `litejax bound --json` object), and litejax.analysis.core.violations says
whether the whole program is within the bound: matmul total and each component within tol of the
analytic figure, either way; the elementwise row within core.ELEMENTWISE_FACTOR of its estimate; a
train step's optimizer update within core.OPTIMIZER_FACTOR of its cost for the parameters a bounded
step touches.
Weight-gradient outer products (the gradient of gathered expert or router slices, lowered by XLA as
multiply + scatter-add into the whole table) are matmul work of the component whose weights they
are, at 2·rows·d·h like any weight-gradient matmul (litejax.hlo.flops, "lowered dot"); they are
listed apart under `lowered_dots_per_token`. So an E-sized dense gradient shows up where it costs:
the whole-table writes and conversions in the elementwise row, the update of every row in the
optimizer row, the table's gradient all-reduce in `all_reduce_bytes_per_rank`, its buffers in
`memory_bytes_per_device.temp`. This module is the forward/train layer on litejax.analysis.core (the
shared keys, the verdict) and the compile every report reads (`compile_traced`, `compile_program`).
"""
from __future__ import annotations

import dataclasses
import math
import time

from litejax.analysis import core
from litejax.model.bounds import COMPONENTS

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
# checks both). The executables are never run (their inputs are abstract): only the HLO is read.
ANALYSIS_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


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


def compile_traced(program, args: tuple, mesh, compiler_options: dict | None = None):
  """(compiled, dot_signatures, seconds): `program` (a jitted function) traced on `args` (abstract) under
  `mesh`, lowered and compiled with `compiler_options` (default ANALYSIS_COMPILER_OPTIONS)."""
  jax = _jax()
  from litejax.hlo.scopes import dot_signatures
  from litejax.model import bounds
  options = ANALYSIS_COMPILER_OPTIONS if compiler_options is None else compiler_options
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):   # the MoE layers choose expert-parallel dispatch from the mesh
    traced = program.trace(*args)
    signatures = dot_signatures(traced.jaxpr, bounds.COMPONENTS)
    compiled = traced.lower().compile(compiler_options=options)
  return compiled, signatures, time.perf_counter() - t0


def compile_program(cfg, *, train: bool = False, num_devices: int | None = None,
                    global_batch: int | None = None, mesh=None,
                    compiler_options: dict | None = None) -> CompiledProgram:
  """Lowers and compiles the forward pass (or a whole training step) from abstract inputs.

  Parameters, optimizer state and tokens are ShapeDtypeStructs carrying their shardings, so nothing
  is allocated whatever the parameter count. global_batch defaults to one sequence per batch rank
  (data · expert): per-token figures depend on it only through capacity rounding. compiler_options:
  as `compile_traced`.
  """
  jax = _jax()
  import jax.numpy as jnp
  from flax import nnx
  from litejax import sharding
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer

  if mesh is None:
    cfg, mesh = make_mesh_for(cfg, num_devices)
  sizes = sharding.mesh_sizes(mesh)
  b = global_batch or sizes['data'] * sizes['expert']
  s = cfg.model.seq_len
  sharding.validate_mesh(cfg, mesh, b)
  tok_sh = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=tok_sh)
  t0 = time.perf_counter()
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
  layout_s = time.perf_counter() - t0
  compiled, signatures, seconds = compile_traced(program, args, mesh, compiler_options)
  return CompiledProgram(compiled, compiled.as_text(), cfg, mesh, train, b, s, layout_s + seconds,
                         mesh.size > 1, signatures)


# ------------------------------------------------------------------------------------------ report

# Scopes the walker attributes to: the model's components and the train step's update.
SCOPES = COMPONENTS + ('optimizer',)


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


def report(prog: CompiledProgram, tol: float = 0.03) -> dict:
  """Analytic vs compiled per-token figures of a compiled program (the `litejax bound --json` object):
  litejax.analysis.core's shared keys, the elementwise row, the dots XLA lowered as elementwise ops,
  the all-reduce bytes, a train step's update and temporaries, and the verdict.

  The bounded work is matmul work (dots by component); elementwise FLOPs, XLA's raw cost_analysis()
  and backend artefacts are reported beside it, never folded in silently.
  """
  from litejax import sharding
  from litejax.hlo import flops as hlo_flops
  from litejax.model import bounds
  cfg = prog.cfg
  walked = hlo_flops.walk(prog.hlo_text, SCOPES, prog.signatures, prog.num_devices)
  per_tok = prog.num_devices / prog.tokens
  sizes = sharding.mesh_sizes(prog.mesh)
  mult = bounds.BWD_MULTIPLIER if prog.train else 1
  analytic = analytic_per_token(cfg, prog.tokens_per_group, train=prog.train,
                                expert_parallel=prog.expert_parallel, expert_ranks=sizes['expert'])
  out = core.walked_report(prog, walked, analytic, sum(bounds.forward_flops_per_token(cfg).values()) * mult, tol)
  elem_a = bounds.elementwise_flops_per_token(cfg) * mult
  elem_k = sum(walked.useful_elementwise(s) for s in walked.elementwise if s != 'optimizer') * per_tok
  out['by_component']['elementwise'] = {'analytic': elem_a, 'compiled': elem_k,
                                        'ratio': elem_k / elem_a if elem_a else math.inf}
  out['lowered_dots_per_token'] = {k: v * per_tok for k, v in walked.lowered_dots.items()}
  out['all_reduce_bytes_per_rank'] = out['collective_bytes_per_rank_by_kind'].get('all_reduce', 0.0)
  out['elementwise_factor'], out['optimizer_factor'] = core.ELEMENTWISE_FACTOR, core.OPTIMIZER_FACTOR
  if prog.train:
    out['optimizer'] = _optimizer(prog, walked, sizes)
    from litejax.analysis import train_temp
    temp = train_temp.temp_report(prog, out['memory_bytes_per_device'])
    if temp:   # the sparse step: XLA:CPU's bf16 table copy set apart, the rest against the touched rows
      out['memory_bytes_per_device']['temp_cpu_bf16_table_copy'] = temp['temp_cpu_bf16_table_copy']
      out['temp_check'] = temp['check']
  out['violations'] = core.violations(out, tol)
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


def _optimizer(prog: CompiledProgram, cost, sizes: dict[str, int]) -> dict:
  """The update's work and traffic (instructions under the train step's 'optimizer' scope) beside
  its estimate: core.OPTIMIZER_FLOPS_PER_PARAM for every parameter a bounded update touches."""
  per_tok = prog.num_devices / prog.tokens
  touched = params_touched_per_step(prog.cfg, sizes, prog.tokens_per_group)
  flops = (cost.useful_elementwise('optimizer') + cost.flops.get('optimizer', 0.0)) * per_tok
  est = core.OPTIMIZER_FLOPS_PER_PARAM * touched / prog.tokens
  per_device = cost.bytes_by_scope.get('optimizer', 0.0)
  return {'flops_per_token': flops, 'flops_per_token_estimate': est, 'ratio': flops / est if est else math.inf,
          'params_touched_per_step_estimate': touched,
          'bytes_accessed_per_step_per_device': per_device,
          'bytes_accessed_per_step': per_device * prog.num_devices}


def bound(cfg, *, train: bool = False, num_devices: int | None = None, global_batch: int | None = None,
          tol: float = 0.03) -> dict:
  """Compile `cfg` from abstract inputs and return its report (see `report`)."""
  return report(compile_program(cfg, train=train, num_devices=num_devices, global_batch=global_batch), tol)
