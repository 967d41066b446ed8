"""`litejax plan`: the smallest slice of a TPU generation on which a config's training step fits.

The search is litejax.planning.smallest_slice; this module parses arguments and prints its answer.
"""
from __future__ import annotations

import argparse
import json
import sys

from litejax.cli import add_config_arguments, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser)
  parser.add_argument('--generation', default='v5p', help='TPU generation: v5p, v5e, v6e or v4 (default v5p)')
  parser.add_argument('--forward', action='store_true',
                      help='plan a forward pass (parameters only), not a training step')
  parser.add_argument('--batch', type=positive_int, default=None,
                      help='global batch (default: one sequence per batch rank of each slice)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def run(args: argparse.Namespace) -> int:
  from litejax import hardware, planning, targets
  from litejax.config import load_config
  cfg = load_config(args.config, args.overrides)
  try:
    hardware.chip(args.generation)
  except ValueError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  from litejax import bounds
  h = bounds.human
  try:
    out = planning.smallest_slice(cfg, args.generation, train=not args.forward, global_batch=args.batch,
               log=(lambda s: None) if args.json else (lambda s: print('  ' + s, flush=True)))
  except targets.TargetError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(out, indent=2, default=float))
    return 0 if out['answer'] else 1
  what = 'forward (parameters)' if args.forward else 'training step (parameters + AdamW state + activations)'
  chip = out['chip']
  if out['answer']:
    print(f"plan: {out['answer']} is the smallest {args.generation} slice where the {what} fits "
          f"({h(chip['hbm_bytes'])}B HBM per chip)")
    print('\n'.join(targets.format_per_chip(out['per_chip'], h)))
    return 0
  s = out.get('shortfall')
  print(f'plan: the {what} fits on no {args.generation} slice')
  if s:
    print(f"  largest slice {s['largest_slice']}: needs {s['need_over_hbm_on_largest_slice']:.3g}x a chip's HBM "
          f"with this config's mesh rules")
    print(f"  state in all: {h(s['state_bytes_total'])}B vs {h(s['pod_hbm_bytes'])}B of HBM in a whole pod "
          f"({s['state_over_pod_hbm']:.3g}x): even sharded perfectly it needs {s['chips_needed_if_fully_sharded']:,} "
          f"chips ({s['pods_needed_if_fully_sharded']:.3g} pods)")
    print('  to fit, most experts must live off-HBM: cold tiers in host memory or storage, fetched on '
          'demand (SPEC-006 I/O term), with only hot tiers resident')
  return 1
