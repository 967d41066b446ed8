"""Tokens/s of a full training step, MoE vs a dense model with the same active parameters, on one
device and on the emulated 8-device mesh (each device count in its own process, since XLA_FLAGS must
be set before JAX starts).

    python experiments/bench_train.py --out out/bench            # tiny and small configs
    python experiments/bench_train.py --quick --out out/bench    # tiny only, fewer steps
    python experiments/bench_train.py --series experts --out out/bench   # E = N·K/4 ... 32·N·K

The experts series runs experiments/bench_train_experts.py (with --out, --quick, --steps and --device),
which writes OUT/bench_train_experts.json, _summary.json and .png: dense vs sparse expert updates beside
the dense model, as E grows.

Writes OUT/bench_train.json: rows with config, model ('moe' | 'dense'), devices, tokens_per_second,
median_step_seconds, compiles (the train step must compile exactly once), and ratio_to_dense.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import harness

SMALL = ['model.d_model=256', 'model.num_heads=8', 'model.num_kv_heads=4', 'model.seq_len=256', 'moe.d_expert=256']
QUICK = ['model.num_layers=2', 'model.seq_len=32']


def worker(args) -> dict:
  """Runs in a fresh process whose XLA_FLAGS already emulate `args.devices` devices."""
  import jax

  from litejax.config import load_config
  from litejax.model import bounds
  from litejax.perf.timing import time_calls
  cfg = load_config(args.config, args.overrides)
  if args.model == 'dense':
    cfg = load_config(args.config, args.overrides + harness.dense_overrides(cfg))
  built = harness.build_train_step(cfg, args.devices)
  step, mesh, state = built['step'], built['mesh'], built['state']
  inputs, targets = built['inputs'], built['targets']
  b, s = cfg.train.batch_size, cfg.model.seq_len
  with jax.set_mesh(mesh):   # the MoE layers pick their dispatch from the mesh
    t0 = time.perf_counter()
    state, m = step(state, inputs, targets)
    jax.block_until_ready(m['loss'])
    compile_s = time.perf_counter() - t0

    last = {'loss': m['loss']}

    def one_step():
      nonlocal state
      state, metrics = step(state, inputs, targets)
      last['loss'] = metrics['loss']
      return metrics['loss']

    med = statistics.median(time_calls(one_step, args.steps, warmup=2))
  counts = bounds.param_counts(cfg)
  return {'config': args.name, 'model': args.model, 'devices': args.devices, 'batch': b, 'seq_len': s,
          'median_step_seconds': med, 'tokens_per_second': b * s / med, 'first_step_seconds': compile_s,
          'compiles': harness.compiles(step), 'timed_steps': args.steps,
          'params_active_per_token': counts.active_per_token,
          'params_total': counts.total, 'loss_last': float(last['loss'])}


def main(argv=None) -> int:
  p = harness.parser(__doc__, out='optional', quick='tiny at half depth and a quarter of the sequence')
  p.add_argument('--steps', type=int, default=0)
  p.add_argument('--device', default='cpu', help='jax platform (cpu, gpu, tpu)')
  p.add_argument('--series', choices=('main', 'experts'), default='main',
                 help='main: tokens/s MoE vs dense (tiny, small); experts: step time and memory vs E')
  p.add_argument('--device-counts', default=None,
                 help='comma-separated device counts to run (default: 1,8 on cpu, emulated; 1 elsewhere)')
  # worker mode (internal)
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--config', default=str(harness.REPO / 'configs' / 'tiny.yaml'))
  p.add_argument('--name', default='tiny')
  p.add_argument('--model', default='moe')
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--set', dest='overrides', action='append', default=[])
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return 0
  if not args.out:
    p.error('--out is required')
  if args.series == 'experts':
    cmd = [sys.executable, str(harness.EXPERIMENTS / 'bench_train_experts.py'), '--out', args.out,
           '--steps', str(args.steps), '--device', args.device] + (['--quick'] if args.quick else [])
    return subprocess.run(cmd).returncode
  steps = args.steps or (5 if args.quick else 10)
  # --quick (exercised in the tests): tiny at half depth and a quarter of the sequence, the same code paths.
  configs = [('tiny', QUICK)] if args.quick else [('tiny', []), ('small', SMALL)]
  rows = []
  counts = [int(c) for c in (args.device_counts or ('1,8' if args.device == 'cpu' else '1')).split(',')]
  for name, overrides in configs:
    for devices in counts:
      for model in ('moe', 'dense'):
        cmd = [sys.executable, __file__, '--worker', '--name', name, '--model', model, '--devices', str(devices),
               '--steps', str(steps), *[a for o in overrides for a in ('--set', o)]]
        row, error = harness.run_json(cmd, harness.child_env(args.device, devices))
        if error is not None:
          row = {'config': name, 'model': model, 'devices': devices, 'tokens_per_second': None, 'error': error}
        rows.append(row)
        print(f"{name:6s} {model:6s} devices={devices}  " +
              (f"{row['tokens_per_second']:10.0f} tokens/s  (compiles: {row['compiles']})"
               if row.get('tokens_per_second')
               else f"FAILED {row.get('error')}"), flush=True)
  facts = harness.machine(args.device)
  for r in rows:
    dense = next((d for d in rows if d['config'] == r['config'] and d['devices'] == r['devices']
                  and d['model'] == 'dense'), None)
    r['ratio_to_dense'] = (r['tokens_per_second'] / dense['tokens_per_second']
                           if r.get('tokens_per_second') and dense and dense.get('tokens_per_second') else None)
    r['machine'] = facts
  path = harness.write_json(harness.out_dir(args.out), 'bench_train.json', rows)
  print(f'wrote {path}')
  bad = [r for r in rows if r.get('compiles') not in (None, 1)]
  if bad:
    print(f'train step recompiled: {bad}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
