"""The bound-report core: what every mode of `litejax bound` (a forward, `--train`, `--decode`, `--target`)
shares, written once. Each mode (litejax.analysis.bound, decode_bound, per_chip) is a small layer on it.

  matmul_block    the compiled matmul FLOPs per token by component beside the analytic ones, their
                  totals and ratio: the figures the verdict judges
  walked_report   the keys every report of a walked program carries (FLOPs, bytes, artefacts, params,
                  collectives, mesh, memory): the `litejax bound --json` object less each mode's own keys
  violations      the one verdict: why a program is not within its bound at tolerance `tol`
  over_depth      the one depth extrapolation: a program's figures from unscanned compiles of one and
                  two layer periods, cost = a + b·periods (XLA's cost_analysis counts a scan body once)
  compile_or_refusal  the one "compiler refused it" path: the TPU compiler's RESOURCE_EXHAUSTED, read
                  into what did not fit, how much it needed and the HBM there was
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

from litejax import units

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
# memory_analysis() parts of one device, as the reports name them.
MEMORY_PARTS = ('argument', 'output', 'temp', 'alias', 'generated_code')


# ------------------------------------------------------------------------------------------ FLOPs

def matmul_block(analytic: dict[str, float], compiled: dict[str, float]) -> dict:
  """Analytic vs compiled matmul FLOPs per token: the totals, their ratio, and `by_component` (every
  component of `analytic`, then 'other', the dots outside any component's scope)."""
  by = {c: _row(a, compiled.get(c, 0.0)) for c, a in analytic.items()}
  by['other'] = _row(0.0, compiled.get('other', 0.0))
  fa, fk = sum(analytic.values()), sum(compiled.values())
  return {'flops_per_token_analytic': fa, 'flops_per_token_compiled': fk,
          'ratio': fk / fa if fa else math.inf, 'by_component': by}


def _row(analytic: float, compiled: float) -> dict[str, float]:
  ratio = compiled / analytic if analytic else (1.0 if compiled == 0 else math.inf)
  return {'analytic': analytic, 'compiled': compiled, 'ratio': ratio}


def walked_report(prog, walked, analytic: dict[str, float], unpadded: float, tol: float) -> dict:
  """The keys shared by the report of every walked program (`prog` a litejax.analysis.bound.CompiledProgram,
  `walked` its litejax.hlo.flops.HloCost): FLOPs per token (matmul by component against `analytic`,
  `unpadded` the bound without padding), XLA's raw cost_analysis, artefacts, bytes, parameters,
  collectives, the run's shape, memory per device. Compiled figures are the SPMD program's per-device
  work × devices / global tokens."""
  from litejax import sharding
  from litejax.model import bounds
  cfg = prog.cfg
  per_tok = prog.num_devices / prog.tokens
  params = bounds.param_counts(cfg)
  ca = prog.compiled.cost_analysis()
  coll = collectives(prog, walked)
  return {
      **matmul_block(analytic, {c: v * per_tok for c, v in walked.flops.items()}),
      'flops_per_token_analytic_unpadded': unpadded,
      'flops_per_token_compiled_with_elementwise': walked.useful_flops * per_tok,
      'flops_per_token_xla_cost_analysis': float(ca.get('flops', 0.0)) * per_tok,
      'artefacts_per_token': {k: v * per_tok for k, v in walked.artefacts.items()},
      'bytes_accessed_per_token_xla': float(ca.get('bytes accessed', 0.0)) * per_tok,
      'bytes_accessed_per_token': walked.bytes_accessed * per_tok,
      'unknown_trip_counts': walked.unknown_trip_counts,
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
      'mesh': sharding.mesh_sizes(prog.mesh),
      'global_batch': prog.global_batch,
      'seq_len': prog.seq_len,
      'tokens_per_group': prog.tokens_per_group,
      'memory_bytes_per_device': {k: v for k, v in memory_per_device(prog.compiled).items() if k in MEMORY_PARTS},
      'spec_formula': bounds.spec_formula(cfg),
      'tol': tol,
  }


def resolve_dispatch_for(prog) -> str:
  """The dispatch path that ran ('none' without MoE layers; expert-parallel runs einsum as capacity)."""
  from litejax.model.moe.capacity import resolve_dispatch
  if not prog.cfg.model.num_moe_layers:
    return 'none'
  path = resolve_dispatch(prog.cfg.moe, prog.tokens_per_group)
  if prog.expert_parallel and path == 'einsum':
    path = 'capacity'
  return path + (' (expert-parallel)' if prog.expert_parallel else '')


# ------------------------------------------------------------------------------------------ the verdict

def violations(rep: dict, tol: float) -> list[str]:
  """Why the program is not within the bound: one line per reason. `rep` holds a `matmul_block`
  (a whole report, or a TPU report's 'matmul' part), optionally with the rows below.

  matmul      the compiled matmul total outside [1 − tol, 1 + tol] × the analytic bound (with
              padding): an undercount is a disagreement too (work the walker cannot see, or a
              bound that does not describe the program);
  component   a component off its analytic figure by more than tol × the total bound, either way,
              so a blow-up in one cannot hide behind slack in another (named when the total is off);
  elementwise the elementwise row (forward + backward, artefacts out) above ELEMENTWISE_FACTOR × its
              estimate (litejax.model.bounds.elementwise_flops_per_token);
  optimizer   the update's FLOPs above OPTIMIZER_FACTOR × OPTIMIZER_FLOPS_PER_PARAM × the
              parameters a bounded step touches (litejax.analysis.bound.params_touched_per_step): a
              dense update of expert tables most of whose rows got no token fails it;
  expert weights  a decode step reading more of the expert tables (backend artefacts out) than the
              active rows' slices, by more than tol.
  (A sparse step's temporaries are checked beside these, `temp_check`, not as a violation: train_temp.)
  """
  out = _matmul_violations(rep, tol)
  el = rep['by_component'].get('elementwise')
  if el and el['analytic'] and el['compiled'] > ELEMENTWISE_FACTOR * el['analytic']:
    out.append(f'elementwise: compiled {el["compiled"]:.4g} FLOPs/token is {el["ratio"]:.4g}x its estimate '
               f'{el["analytic"]:.4g} (> {ELEMENTWISE_FACTOR:g}x)')
  opt = rep.get('optimizer')
  if opt and opt['flops_per_token'] > OPTIMIZER_FACTOR * opt['flops_per_token_estimate']:
    out.append(f'optimizer: the update costs {opt["flops_per_token"]:.4g} FLOPs/token, {opt["ratio"]:.4g}x '
               f'the estimate {opt["flops_per_token_estimate"]:.4g} for the parameters a bounded step '
               f'touches (> {OPTIMIZER_FACTOR:g}x): it updates rows no token reached')
  read, slices = rep.get('expert_weight_bytes_per_token_without_artefacts'), rep.get('expert_weight_bytes_per_token_analytic')
  if read is not None and read > (1 + tol) * slices:
    out.append(f"expert weights read {read:.4g} B/token exceed the active rows' slices {slices:.4g} B/token by "
               f'more than {tol:.0%}')
  return out


def _matmul_violations(rep: dict, tol: float) -> list[str]:
  fa, fk = rep['flops_per_token_analytic'], rep['flops_per_token_compiled']
  off = []
  for name, row in rep['by_component'].items():
    if name == 'elementwise':
      continue
    delta = row['compiled'] - row['analytic']
    if abs(delta) > tol * fa:
      off.append((abs(delta), delta, name))
  off.sort(reverse=True)
  if not (1 - tol) * fa <= fk <= (1 + tol) * fa:
    how = 'exceeds' if fk > fa else 'falls short of'
    named = [f'{n} ({d / fa:+.1%} of the bound)' for _, d, n in off]
    return [f'matmul: compiled {fk:.4g} FLOPs/token {how} the analytic bound {fa:.4g} by '
            f'{abs(fk / fa - 1):.1%} (> {tol:.0%}): {", ".join(named) or "spread over components"}']
  return [f'component {n}: compiled {rep["by_component"][n]["compiled"]:.4g} vs analytic '
          f'{rep["by_component"][n]["analytic"]:.4g}, {d / fa:+.1%} of the bound (> {tol:.0%})' for _, d, n in off]


# ------------------------------------------------------------------------------------------ bytes

def collectives(prog, cost) -> dict:
  """Collective bytes per rank for the whole program: compiled (as XLA:CPU moves them, and the
  all-to-all at the program's dtypes) and analytic (the expert-parallel all-to-alls).

  The analytic figure (litejax.model.moe.buffer_plan) counts both all-to-alls of every MoE layer's forward pass,
  dispatch out and combine back (+ the expert ids the gather path sends), twice in a training step
  (their transposes). It is compared with the compiled all-to-all bytes only; other kinds (the
  partitioner's all-gathers, gradient all-reduces) are listed beside it, not hidden. XLA:CPU moves
  bf16 all-to-all operands as f32 (a convert just before the collective doubles their bytes): the
  comparable figure counts those at the program's 2 bytes and reports the difference apart.
  """
  from litejax import sharding
  from litejax.model.moe import buffer_plan
  by_kind = dict(cost.collective_bytes)
  upcast = float(cost.collective_upcast_bytes.get('all_to_all', 0.0))
  a2a = by_kind.get('all_to_all', 0.0) - upcast
  analytic = {'dispatch': 0.0, 'combine': 0.0, 'metadata': 0.0, 'router': 0.0, 'total': 0.0}
  s = sharding.mesh_sizes(prog.mesh)
  if prog.expert_parallel and s['expert'] > 1 and prog.cfg.model.num_moe_layers:
    per_layer = buffer_plan.analytic_all_to_all_bytes_per_rank(prog.cfg, prog.tokens, s,
                                                               units.dtype_bytes(prog.cfg.model.dtype))
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


def memory_per_device(compiled) -> dict[str, int]:
  """memory_analysis() of one device: arguments, outputs, temporaries, aliased, code (MEMORY_PARTS), and
  the total, donated arguments (the train step's state) counted once as they alias outputs; {} where the
  backend reports none."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  out = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0) for k in MEMORY_PARTS}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp'] + out['generated_code']
  return out


# ------------------------------------------------------------------------------------------ depth

def shallow_config(cfg, periods: int):
  """`cfg` cut to `periods` periods of `moe_every` layers, unscanned (every layer its own HLO)."""
  period = max(cfg.model.moe_every, 1)
  return cfg.replace(model=dataclasses.replace(cfg.model, num_layers=periods * period, scan_layers=False))


def over_depth(figures_at: Callable, cfg, periods: int) -> dict:
  """A full-depth program's figures from two shallow ones: `figures_at(shallow_config(cfg, n))` for n = 1
  and 2 (a dict of numbers, or of such dicts), each figure a + b·n, taken at n = `periods`."""
  one, two = figures_at(shallow_config(cfg, 1)), figures_at(shallow_config(cfg, 2))
  return _affine(one, two, periods)


def _affine(one: dict, two: dict, n: int) -> dict:
  out = {}
  for k in {**one, **two}:
    a, b = one.get(k), two.get(k)
    if isinstance(a if a is not None else b, dict):
      out[k] = _affine(a or {}, b or {}, n)
    else:
      out[k] = (a or 0.0) + ((b or 0.0) - (a or 0.0)) * (n - 1)
  return out


# ------------------------------------------------------------------------------------------ refusals

# The TPU compiler refuses a program that cannot fit: "... the total memory required for HLO
# temporaries (231.72T) exceeds available HBM (95.74G)". Sizes are binary (XLA's HumanReadableNumBytes).
_OOM_RE = re.compile(r'memory required for ([\w ]+?) \(([\d.]+)([KMGTPE]?)\) exceeds available HBM '
                     r'\(([\d.]+)([KMGTPE]?)\)')
_BINARY = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40, 'P': 2 ** 50, 'E': 2 ** 60}


def parse_out_of_memory(message: str) -> dict | None:
  """{'what', 'required_bytes', 'available_bytes'} from a TPU compiler RESOURCE_EXHAUSTED message."""
  m = _OOM_RE.search(message)
  if not m:
    return None
  return {'what': m.group(1), 'required_bytes': float(m.group(2)) * _BINARY[m.group(3)],
          'available_bytes': float(m.group(4)) * _BINARY[m.group(5)]}


def compile_or_refusal(compile_fn: Callable):
  """(compile_fn(), None), or (None, refusal) when the TPU compiler refuses the program for lack of HBM:
  parse_out_of_memory's figures and `message`, the line the reports carry as 'compiler_refused'. Any
  other error propagates."""
  try:
    return compile_fn(), None
  except Exception as e:  # jax.errors.JaxRuntimeError: the TPU compiler refuses what cannot fit
    oom = parse_out_of_memory(str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or oom is None:
      raise
  return None, {**oom, 'message': f"{oom['what']} need {units.si(oom['required_bytes'], 'B')} per device, "
                                  f"HBM {units.si(oom['available_bytes'], 'B')}"}
