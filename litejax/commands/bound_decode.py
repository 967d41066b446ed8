"""`litejax bound --decode`: the decode step's cost per generated token (litejax.decode_cost), printed.

Like commands/bound.py, jax is imported only after `--devices` has set XLA_FLAGS.
"""
from __future__ import annotations

import argparse
import sys

from litejax.devices import set_cpu_device_count


def run(args: argparse.Namespace, cfg) -> int:
  if args.cache_len and not args.decode:
    print('litejax bound: --cache-len needs --decode', file=sys.stderr)
    return 2
  if args.train:
    print('litejax bound: --decode and --train are exclusive (a decode step is a forward)', file=sys.stderr)
    return 2
  cache_len = args.cache_len or cfg.model.seq_len
  from litejax.commands.bound import emit, target_devices
  target = target_devices(args)
  if target is None:
    return 2
  if target == 'tpu':
    return _run_target(args, cfg, cache_len)
  set_cpu_device_count(target, cpu_only=True)
  from litejax import bounds, decode_cost
  try:
    rep = decode_cost.bound_decode(cfg, batch=args.batch, cache_len=cache_len, num_devices=target,
                                   chip=decode_cost.host_chip(), tol=args.tol)
  except ValueError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return 2
  return emit(args, rep, lambda r: _print(args.config, r, bounds.human))


def _run_target(args, cfg, cache_len: int) -> int:
  set_cpu_device_count(1, cpu_only=True)
  from litejax import bounds, decode_cost, targets
  try:
    rep = decode_cost.target_report(cfg, targets.resolve(args.target), batch=args.batch, cache_len=cache_len)
  except targets.TargetError as e:
    print(f'litejax bound: {e}', file=sys.stderr)
    return 2
  from litejax.commands.bound import emit
  return emit(args, rep, lambda r: _print(args.config, r, bounds.human))


def _print(path: str, rep: dict, h) -> None:
  from litejax.targets import human_bytes as hb
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
  print(f"bytes accessed/token {hb(rep['bytes_accessed_per_token'])}; expert weights read "
        + (f"{hb(rep['expert_weight_bytes_per_token'])}/token (active rows' slices "
           f"{hb(rep['expert_weight_bytes_per_token_analytic'])}, every expert "
           f"{hb(rep['expert_weight_bytes_all_experts'])})" if 'expert_weight_bytes_per_token' in rep else
           f"(analytic, active rows' slices) {hb(rep['expert_weight_bytes_per_token_analytic'])}/token"))
  print(f"collective bytes/rank per step {hb(rep['collective_bytes_per_rank'])}")
  if 'latency' in rep:
    from litejax import latency
    print('per token: ' + latency.format_estimate(rep['latency'], h))
  if 'violations' in rep and 'by_component' in rep:
    print('BOUND OK' if not rep['violations'] else 'BOUND EXCEEDED')
