"""`litejax plan`: the smallest slice of a TPU generation on which a config's training step fits.

The search is litejax.analysis.planning.smallest_slice; this module parses arguments and prints its answer.
"""
from __future__ import annotations

import argparse
import json
import sys

from litejax import units
from litejax.commands.args import add_config_arguments, config_from_args, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser, checkpoint=True)
  parser.add_argument('--generation', default='v5p', help='TPU generation: v5p, v5e, v6e or v4 (default v5p)')
  parser.add_argument('--forward', action='store_true',
                      help='plan a forward pass (parameters only), not a training step')
  parser.add_argument('--batch', type=positive_int, default=None,
                      help='global batch (default: one sequence per batch rank of each slice)')
  parser.add_argument('--serve', action='store_true',
                      help='plan serving from the tiered expert store: 1%% of experts in device slots + KV cache '
                           'in HBM, 10%% in host RAM, the rest on disk; latency at the --hit-rates given')
  parser.add_argument('--hit-rates', metavar='PATH',
                      help='--serve: price the I/O term at the hit rates of this tiers benchmark JSON (lru, 1%% '
                           'device slots; python experiments/bench_tiers.py --out DIR writes DIR/bench_tiers.json); '
                           'without it there is no I/O term')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def run(args: argparse.Namespace) -> int:
  from litejax.perf import chips as hardware
  from litejax.analysis import per_chip, planning, targets
  from litejax.config import InputError
  cfg = config_from_args(args)
  if args.hit_rates and not args.serve:
    raise InputError('--hit-rates: prices the I/O term of --serve; add --serve')
  try:
    hardware.chip(args.generation)
  except ValueError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  h = units.si
  if args.serve:
    return _serve(cfg, args, h)
  try:
    out = planning.smallest_slice(cfg, args.generation, train=not args.forward, global_batch=args.batch,
               log=(lambda s: None) if args.json else (lambda s: print('  ' + s, flush=True)))
  except targets.TargetError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(out, indent=2, default=float))
    return 0 if out['answer'] else 1
  what = 'forward (parameters)' if args.forward else 'training step (parameters + optimizer state + activations)'
  chip = out['chip']
  if 'train_state' in out:
    _print_train_state(out, h)
  if out['answer']:
    print(f"plan: {out['answer']} is the smallest {args.generation} slice where the {what} fits "
          f"({h(chip['hbm_bytes'])}B HBM per chip)")
    print('\n'.join(per_chip.format_per_chip(out['per_chip'])))
    return 0
  s = out.get('shortfall')
  print(f'plan: the {what} fits on no {args.generation} slice')
  if not s:
    print(f"  no {args.generation} slice's mesh divides this config (see the reasons above)")
  if s:
    t = s['state_by_table_per_chip_on_largest_slice']
    print(f"  largest slice whose mesh divides the config, {s['largest_slice']}: needs "
          f"{s['need_over_hbm_on_largest_slice']:.3g}x a chip's HBM with this config's mesh rules; state per chip "
          f"{units.si(s['state_bytes_per_chip_on_largest_slice'], 'B')} = expert tables {units.si(t['experts'], 'B')} + "
          f"router_expert {units.si(t['router_expert'], 'B')} + the rest {units.si(t['other'], 'B')}"
          + (f" (not dividing: {', '.join(s['slices_whose_mesh_does_not_divide'])})"
             if s['slices_whose_mesh_does_not_divide'] else ''))
    if s['least_short_slice'] != s['largest_slice']:
      t = s['state_by_table_per_chip_on_least_short_slice']
      replicated = t['router_expert'] < s['state_by_table_per_chip_on_largest_slice']['router_expert']
      print(f"  least short: {s['least_short_slice']}, {s['need_over_hbm_on_least_short_slice']:.3g}x a chip's HBM "
            f"(expert tables {units.si(t['experts'], 'B')} + router_expert {units.si(t['router_expert'], 'B')} + the rest "
            f"{units.si(t['other'], 'B')})" + (': a larger slice whose expert ranks do not divide the T·G routing groups '
                                        'replicates router_expert (sharding.groups_shard)' if replicated else ''))
    print(f"  state in all: {h(s['state_bytes_total'])}B vs {h(s['pod_hbm_bytes'])}B of HBM in a whole pod "
          f"({s['state_over_pod_hbm']:.3g}x): even sharded perfectly it needs {s['chips_needed_if_fully_sharded']:,} "
          f"chips ({s['pods_needed_if_fully_sharded']:.3g} pods)")
    t = s.get('host_tier')
    if t:
      print(f"  next tier, host memory ({units.si(t['host_ram_bytes_per_chip'], 'B')} per chip: {t['host_ram_source']}): with "
            f"a whole pod's HBM full it must hold {units.si(t['host_must_hold_bytes'], 'B')}, "
            f"{units.si(t['host_must_hold_bytes_per_chip'], 'B')} "
            f"per chip ({t['need_over_host_ram']:.3g}x its host RAM); HBM + host RAM of a pod hold "
            f"{1 / t['state_over_pod_hbm_plus_host']:.3g}x of the state ({t['chips_needed_hbm_plus_host']:,} chips "
            f"needed); activations not counted")
    print('  to fit, most experts must live off-HBM: cold tiers in host memory or storage, fetched on '
          'demand (SPEC-006 I/O term), with only hot tiers resident')
  return 1


def _print_train_state(out: dict, h) -> None:
  """The training state the search used (the config's expert update and optimizer) and the alternatives."""
  st = out['train_state']
  print(f"training state: expert update {st['expert_update']}, expert optimizer {st['expert_optimizer']}: "
        f"{units.si(st['state_total_all_chips'], 'B')} = parameters {units.si(st['params_total_all_chips'], 'B')} + optimizer "
        f"{units.si(st['optimizer_total_all_chips'], 'B')} (train.expert_update / train.expert_optimizer; --set to change)")
  for o in out.get('train_state_options', []):
    print(f"  {o['expert_update']:6s} {o['expert_optimizer']:8s} state {units.si(o['state_bytes_total'], 'B')} (experts "
          f"{units.si(o['expert_state_bytes_total'], 'B')}), {units.si(o['bytes_per_chip_on_pod_if_fully_sharded'], 'B')} per chip "
          f"on a whole pod = {o['state_over_pod_hbm']:.3g}x HBM, "
          f"{o['chips_needed_if_fully_sharded']:,} chips if perfectly sharded"
          + ('   <- this config' if o['chosen'] else ''))


def _serve(cfg, args, h) -> int:
  from litejax.analysis import planning
  try:
    hit_rates = planning.read_hit_rates(args.hit_rates) if args.hit_rates else None
    out = planning.serve_plan(cfg, args.generation, batch=args.batch or 1, hit_rates=hit_rates)
  except ValueError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(out, indent=2, default=float))
    return 0 if out['answer'] else 1
  b, host = out['bytes'], out['host']
  print(f"serve: experts {units.si(b['experts'], 'B')} on disk; HBM: non-expert {units.si(b['non_expert'], 'B')} + 1% device slots + "
        f"KV cache {units.si(b['kv_cache'], 'B')} = {units.si(b['device_total'], 'B')}; host cache (10%) {units.si(b['host_total'], 'B')}")
  print(f"  host RAM per chip assumed {units.si(host['host_ram_bytes'], 'B')} ({host['host_ram_source']})")
  for r in out['tried']:
    print(f"  {r['target']:16s} HBM {r['hbm_bytes_per_chip'] / out['chip_hbm_bytes']:.3g}x  "
          f"host {r['host_bytes_per_chip'] / host['host_ram_bytes']:.3g}x")
  if out['answer']:
    print(f"plan --serve: {out['answer']} is the smallest {args.generation} slice that serves this config")
  else:
    print(f"plan --serve: no {args.generation} slice serves this config: {out['why_none']}")
  lat = out.get('latency')
  if lat and 'pregate' in lat:
    print(f"  per-token latency at batch 1: {lat['per_token_ms']:.3g} ms = compute {lat['compute_ms']:.3g} + the I/O "
          f"that does not fit under it {lat['io_exposed_ms']:.3g} (of host->HBM {lat['io_host_to_hbm_ms']:.3g} + disk "
          f"{lat['io_disk_ms']:.3g}; hit rates device {lat['hit_rates']['device']:.3f}, device or host "
          f"{lat['hit_rates']['device_or_host']:.3f}: {lat['hit_rates']['source']})")
    print(f"  pre-gated (moe.pregate={lat['pregate']}): a layer's experts are read from the time the MoE layer "
          f"{lat['pregate']} earlier runs, overlapping the compute in between ({lat['io_overlapped_ms']:.3g} ms of I/O "
          f"hidden; the first {lat['pregate']} MoE layer(s) of a token read on demand)")
  elif lat:
    print(f"  per-token latency at batch 1: {lat['per_token_ms']:.3g} ms = compute {lat['compute_ms']:.3g} + "
          f"host->HBM {lat['io_host_to_hbm_ms']:.3g} + disk {lat['io_disk_ms']:.3g} (hit rates device "
          f"{lat['hit_rates']['device']:.3f}, device or host {lat['hit_rates']['device_or_host']:.3f}: "
          f"{lat['hit_rates']['source']})")
  else:
    print('  no I/O term: no --hit-rates given (a tiers benchmark JSON: python experiments/bench_tiers.py '
          '--out DIR writes DIR/bench_tiers.json; a checkout has experiments/results/bench_tiers.json)')
  return 0 if out['answer'] else 1
