"""`litejax bound`: compile a config from abstract shapes and check compiled FLOPs against the bound
(a forward, a whole train step with --train, one decode step with --decode; for a TPU slice with --target).

JAX is imported only inside `run`, after `--devices N` has set XLA_FLAGS (an emulated N-device CPU
mesh), so this module must not import jax at import time.
"""
from __future__ import annotations

import argparse
import json
import sys

from litejax import units
from litejax.commands.args import add_config_arguments, config_from_args, positive_int
from litejax.env import set_cpu_device_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser, checkpoint=True)
  parser.add_argument('--train', action='store_true', help='compile a whole training step, not a forward')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--tol', type=float, default=0.03, help='allowed excess over the padded bound')
  parser.add_argument('--devices', type=positive_int, default=8, help='emulated CPU devices (default 8)')
  parser.add_argument('--target', default=None,
                      help="compile for TOPOLOGY: cpu:N (emulated, default cpu:--devices) or a TPU slice such as "
                           "v5p:8x8x8, v5e:16x16, v6e:8x8, v4:4x4x4 (needs pip install 'litejax[tpu]')")
  parser.add_argument('--batch', type=positive_int, default=None,
                      help='global batch for the compile (default: one sequence per batch rank)')
  parser.add_argument('--decode', action='store_true',
                      help='compile one decode step (KV cache, dropless routing) and report per generated token')
  parser.add_argument('--cache-len', type=positive_int, default=None,
                      help='--decode: KV cache length (default: model.seq_len)')


def run(args: argparse.Namespace) -> int:
  cfg = config_from_args(args)
  if args.decode or args.cache_len:
    return _run_decode(args, cfg)
  target = target_devices(args)
  if target is None:
    return 2
  if target == 'tpu':
    return _run_target(args, cfg)
  set_cpu_device_count(target, cpu_only=True)   # no-op when called in-process after jax (tests)
  from litejax.analysis import bound as bound_report
  rep = bound_report.bound(cfg, train=args.train, num_devices=target, global_batch=args.batch, tol=args.tol)
  return emit(args, rep, lambda r: _print_table(args.config, r))


def target_devices(args: argparse.Namespace) -> int | str | None:
  """The emulated CPU device count (`--devices`, or N of `--target cpu:N`), 'tpu' for a TPU slice, or None
  after printing one line for a malformed --target. Imports no jax (safe before XLA_FLAGS is set)."""
  if not args.target:
    return args.devices
  from litejax.analysis.targets import TargetError, parse_target
  try:
    kind, dims = parse_target(args.target)
  except TargetError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return None
  return dims[0] if kind == 'cpu' else 'tpu'


def emit(args: argparse.Namespace, rep: dict, print_table) -> int:
  """Prints the report (JSON or table) and one line per violation; exit 1 when there is one."""
  if args.json:
    print(json.dumps(rep, indent=2, default=float))
  else:
    print_table(rep)
  for v in rep.get('violations', ()):
    print(f'litejax bound: BOUND EXCEEDED: {v}', file=sys.stderr)
  return 1 if rep.get('violations') else 0


def _run_target(args: argparse.Namespace, cfg) -> int:
  """--target TPU: the per-chip report (litejax.analysis.per_chip) of the step compiled for that slice."""
  set_cpu_device_count(1, cpu_only=True)
  from litejax.analysis import per_chip, targets
  try:
    rep = per_chip.compile_report(cfg, targets.resolve(args.target), train=args.train, global_batch=args.batch,
                                  tol=args.tol)
  except targets.TargetError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return 2

  def table(r):
    print(f'config: {args.config}')
    print('\n'.join(per_chip.format_per_chip(r)))
    if 'matmul' in r:
      print('BOUND OK' if not r['violations'] else 'BOUND EXCEEDED')
  return emit(args, rep, table)


def _print_table(path: str, rep: dict) -> None:
  h = units.si
  sf = rep['spec_formula']
  kind = 'train step' if rep['train'] else 'forward'
  print(f"config: {path}   ({kind}, {rep['devices']} devices {rep['mesh']}, batch {rep['global_batch']}x"
        f"{rep['seq_len']}, N={rep['tokens_per_group']} tokens/group, dispatch={rep['dispatch']}, "
        f"compiled in {rep['compile_seconds']:.1f}s)")
  print(f"params total {h(rep['params_total'])}  active/token {h(rep['params_active_per_token'])}  "
        f"expert active/token {h(rep['params_expert_active_per_token'])}")
  print(f"spec: {sf['formula']}")
  print(f"      L={sf['L']} d={sf['d']} h={sf['h']} K={sf['K']} a={sf['a']:.3g} b={sf['b']:.3g}")
  print(f"{'component':18s} {'analytic':>10s} {'compiled':>10s} {'ratio':>7s}   (FLOPs/token)")
  for name, row in rep['by_component'].items():
    if not row['analytic'] and not row['compiled']:
      continue
    note = f"  (estimate; within {rep['elementwise_factor']:g}x)" if name == 'elementwise' else ''
    print(f"{name:18s} {h(row['analytic']):>10s} {h(row['compiled']):>10s} {row['ratio']:7.4f}{note}")
  print(f"{'TOTAL (matmul)':18s} {h(rep['flops_per_token_analytic']):>10s} "
        f"{h(rep['flops_per_token_compiled']):>10s} {rep['ratio']:7.4f}   tol {rep['tol']:.0%}")
  if rep['lowered_dots_per_token']:
    print(f"  incl. dots XLA lowered as elementwise ops (outer-product weight gradients + their scatter-add): "
          f"{ {k: h(v) for k, v in rep['lowered_dots_per_token'].items()} }")
  opt = rep.get('optimizer')
  if opt:
    print(f"optimizer update: {h(opt['flops_per_token'])} FLOPs/token vs {h(opt['flops_per_token_estimate'])} "
          f"for the parameters a bounded step touches (ratio {opt['ratio']:.4g}, within {rep['optimizer_factor']:g}x); "
          f"bytes accessed {h(opt['bytes_accessed_per_step'])}B per step")
  print(f"XLA cost_analysis() raw: {h(rep['flops_per_token_xla_cost_analysis'])} FLOPs/token "
        f"(while bodies counted once, artefacts included); artefacts: "
        f"{ {k: h(v) for k, v in rep['artefacts_per_token'].items()} }")
  print(f"bytes accessed/token: XLA {h(rep['bytes_accessed_per_token_xla'])}, walker "
        f"{h(rep['bytes_accessed_per_token'])}")
  print(f"collective bytes/rank: all-to-all compiled {h(rep['collective_bytes_per_rank'])} vs analytic "
        f"{h(rep['collective_bytes_per_rank_analytic'])} (dispatch + combine, every MoE layer)")
  other = rep['collective_bytes_per_rank_other_kinds']
  if other or rep['collective_bytes_per_rank_cpu_bf16_upcast']:
    print(f"  as XLA:CPU moves them: {h(rep['collective_bytes_per_rank_all_kinds'])} in all "
          f"(bf16 widened to f32: {h(rep['collective_bytes_per_rank_cpu_bf16_upcast'])}; other kinds: "
          f"{ {k: h(v) for k, v in other.items()} })")
  print(f"  all-reduce: {h(rep['all_reduce_bytes_per_rank'])}B per rank")
  for note in rep['collective_notes']:
    print(f'  note: {note}')
  print('memory/device: ' + ', '.join(f'{k} {h(v)}B' for k, v in rep['memory_bytes_per_device'].items()))
  tc = rep.get('temp_check')
  if tc:
    print(f"  temp beyond the CPU bf16 table copy (XLA:CPU scatters bf16 tables through a uint16 copy; TPU "
          f"does not): {h(tc['temp_minus_artefact'])}B = {tc['ratio']:.3g}x the touched experts' training state "
          f"{h(tc['touched_expert_state'])}B ({'within' if tc['ok'] else 'above'} {tc['factor']:g}x)")
  print('BOUND OK' if not rep['violations'] else 'BOUND EXCEEDED')


def _run_decode(args: argparse.Namespace, cfg) -> int:
  """--decode: the decode step's cost per generated token (litejax.analysis.decode_bound)."""
  if args.cache_len and not args.decode:
    print('litejax bound: --cache-len needs --decode', file=sys.stderr)
    return 2
  if args.train:
    print('litejax bound: --decode and --train are exclusive (a decode step is a forward)', file=sys.stderr)
    return 2
  cache_len = args.cache_len or cfg.model.seq_len
  target = target_devices(args)
  if target is None:
    return 2
  if target == 'tpu':
    return _run_decode_target(args, cfg, cache_len)
  set_cpu_device_count(target, cpu_only=True)
  from litejax.analysis import decode_bound
  from litejax.perf.host import measure_host
  try:
    rep = decode_bound.bound_decode(cfg, batch=args.batch, cache_len=cache_len, num_devices=target,
                                    chip=measure_host(repeats=3), tol=args.tol)
  except ValueError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return 2
  return emit(args, rep, lambda r: _print_decode(args.config, r))


def _run_decode_target(args, cfg, cache_len: int) -> int:
  set_cpu_device_count(1, cpu_only=True)
  from litejax.analysis import decode_bound, targets
  try:
    rep = decode_bound.target_report(cfg, targets.resolve(args.target), batch=args.batch, cache_len=cache_len,
                                     tol=args.tol)
  except targets.TargetError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return 2
  return emit(args, rep, lambda r: _print_decode(args.config, r))


def _print_decode(path: str, rep: dict) -> None:
  h = units.si
  where = rep.get('target') or f"{rep['devices']} devices {rep['mesh']}"
  print(f"config: {path}   (decode step, {where}, batch {rep['batch']}, cache {rep['cache_len']})")
  if 'compiler_refused' in rep:
    print(f"  the TPU compiler refused the full-depth step: {rep['compiler_refused']}")
  if 'by_component' in rep:
    print(f"{'component':18s} {'analytic':>10s} {'compiled':>10s} {'ratio':>7s}   (FLOPs/token)")
    for name, row in rep['by_component'].items():
      if row['analytic'] or row['compiled']:
        print(f"{name:18s} {h(row['analytic']):>10s} {h(row['compiled']):>10s} {row['ratio']:7.4f}")
  print(f"{'TOTAL':18s} {h(rep['flops_per_token_analytic']):>10s} {h(rep['flops_per_token_compiled']):>10s} "
        f"{rep['ratio']:7.4f}")
  if 'matmul' in rep:   # a TPU target: the compiled TOTAL is cost_analysis, elementwise work included
    from litejax.analysis.per_chip import matmul_line
    print(matmul_line(rep['matmul'], rep['tol'], 'matmul: '))
  print(f"bytes accessed/token {h(rep['bytes_accessed_per_token'], 'B')}; expert weights read "
        + (f"{h(rep['expert_weight_bytes_per_token'], 'B')}/token (active rows' slices "
           f"{h(rep['expert_weight_bytes_per_token_analytic'], 'B')}, every expert "
           f"{h(rep['expert_weight_bytes_all_experts'], 'B')})" if 'expert_weight_bytes_per_token' in rep else
           f"(analytic, active rows' slices) {h(rep['expert_weight_bytes_per_token_analytic'], 'B')}/token"))
  print(f"collective bytes/rank per step {h(rep['collective_bytes_per_rank'], 'B')}")
  if 'latency' in rep:
    from litejax.perf import latency
    print('per token: ' + latency.format_estimate(rep['latency']))
  if 'by_component' in rep or 'matmul' in rep:
    print('BOUND OK' if not rep['violations'] else 'BOUND EXCEEDED')
