"""Tokens/s of a full training step, MoE vs a dense model with the same active parameters, on one
device and on the emulated 8-device mesh (each device count in its own process, since XLA_FLAGS must
be set before JAX starts).

    python experiments/bench_train.py --out out/bench            # tiny and small configs
    python experiments/bench_train.py --quick --out out/bench    # tiny only, fewer steps
    python experiments/bench_train.py --series experts --out out/bench   # E = N·K/4 ... 32·N·K

The experts series (experiments/bench_train_experts.py) writes OUT/bench_train_experts.json,
_summary.json and .png: dense vs sparse expert updates beside the dense model, as E grows.

Writes OUT/bench_train.json: rows with config, model ('moe' | 'dense'), devices, tokens_per_second,
median_step_seconds, compiles (the train step must compile exactly once), and ratio_to_dense.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ['model.d_model=256', 'model.num_heads=8', 'model.num_kv_heads=4', 'model.seq_len=256', 'moe.d_expert=256']
QUICK = ['model.num_layers=2', 'model.seq_len=32']


def dense_overrides(cfg) -> list[str]:
  """The dense model with the MoE's active FFN parameters: every layer a dense FFN of hidden
  K·h + num_shared·d_shared (the routed and shared experts a token runs)."""
  m = cfg.moe
  hidden = m.k_active * m.d_expert + m.num_shared_experts * m.resolved_d_shared
  return ['model.moe_every=0', f'model.d_ff={hidden}', f'model.ffn_kind={m.expert_kind}']


def build(cfg, devices: int) -> dict:
  """A config's jitted train step, fresh state and one batch of random tokens on `devices` devices."""
  import jax
  import numpy as np

  from litejax import sharding
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
  tx = make_optimizer(cfg.train)
  graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
  batch_sh = sharding.batch_sharding(mesh)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, batch_sh)
  b, s = cfg.train.batch_size, cfg.model.seq_len
  tok = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(b, s + 1)).astype(np.int32)
  return {'cfg': cfg, 'mesh': mesh, 'step': step, 'state': train_step.init_state(cfg, mesh, tx, shardings),
          'inputs': jax.device_put(tok[:, :-1], batch_sh), 'targets': jax.device_put(tok[:, 1:], batch_sh)}


def worker(args) -> dict:
  """Runs in a fresh process whose XLA_FLAGS already emulate `args.devices` devices."""
  import jax

  from litejax.config import load_config
  from litejax.perf.timing import time_calls
  cfg = load_config(args.config, args.overrides)
  if args.model == 'dense':
    cfg = load_config(args.config, args.overrides + dense_overrides(cfg))
  built = build(cfg, args.devices)
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
  from litejax import jaxcompat
  from litejax.model import bounds
  return {'config': args.name, 'model': args.model, 'devices': args.devices, 'batch': b, 'seq_len': s,
          'median_step_seconds': med, 'tokens_per_second': b * s / med, 'first_step_seconds': compile_s,
          'compiles': jaxcompat.compiled_variants(step), 'timed_steps': args.steps,
          'params_active_per_token': bounds.param_counts(cfg).active_per_token,
          'params_total': bounds.param_counts(cfg).total, 'loss_last': float(last['loss'])}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out')
  p.add_argument('--quick', action='store_true')
  p.add_argument('--steps', type=int, default=0)
  p.add_argument('--device', default='cpu', help='jax platform (cpu, gpu, tpu)')
  p.add_argument('--series', choices=('main', 'experts'), default='main',
                 help='main: tokens/s MoE vs dense (tiny, small); experts: step time and memory vs E')
  p.add_argument('--device-counts', default=None,
                 help='comma-separated device counts to run (default: 1,8 on cpu, emulated; 1 elsewhere)')
  # worker mode (internal)
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--config', default=str(REPO / 'configs' / 'tiny.yaml'))
  p.add_argument('--name', default='tiny')
  p.add_argument('--model', default='moe')
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--set', dest='overrides', action='append', default=[])
  p.add_argument('--experts', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker and args.series == 'experts':
    import bench_train_experts as bx
    tokens = bx.QUICK_TOKENS if args.quick else bx.TOKENS
    print(json.dumps([r for e in args.experts.split(',') for r in bx.measure(int(e), tokens, args.steps)]))
    return 0
  if args.worker:
    print(json.dumps(worker(args)))
    return 0
  if not args.out:
    p.error('--out is required')
  if args.series == 'experts':
    return experts_series(args)
  steps = args.steps or (5 if args.quick else 10)
  # --quick (exercised in the tests): tiny at half depth and a quarter of the sequence, the same code paths.
  configs = [('tiny', QUICK)] if args.quick else [('tiny', []), ('small', SMALL)]
  rows = []
  counts = [int(c) for c in (args.device_counts or ('1,8' if args.device == 'cpu' else '1')).split(',')]
  for name, overrides in configs:
    for devices in counts:
      for model in ('moe', 'dense'):
        env = dict(os.environ, JAX_PLATFORMS=args.device)
        if args.device == 'cpu':
          env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
        cmd = [sys.executable, __file__, '--worker', '--name', name, '--model', model, '--devices', str(devices),
               '--steps', str(steps), *[a for o in overrides for a in ('--set', o)]]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
          row = {'config': name, 'model': model, 'devices': devices, 'tokens_per_second': None,
                 'error': r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit {r.returncode}'}
        else:
          row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:6s} {model:6s} devices={devices}  " +
              (f"{row['tokens_per_second']:10.0f} tokens/s  (compiles: {row['compiles']})"
               if row.get('tokens_per_second')
               else f"FAILED {row.get('error')}"), flush=True)
  for r in rows:
    dense = next((d for d in rows if d['config'] == r['config'] and d['devices'] == r['devices']
                  and d['model'] == 'dense'), None)
    r['ratio_to_dense'] = (r['tokens_per_second'] / dense['tokens_per_second']
                           if r.get('tokens_per_second') and dense and dense.get('tokens_per_second') else None)
    r['machine'] = {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'platform': args.device}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'bench_train.json').write_text(json.dumps(rows, indent=1))
  print(f'wrote {out / "bench_train.json"}')
  bad = [r for r in rows if r.get('compiles') not in (None, 1)]
  if bad:
    print(f'train step recompiled: {bad}', file=sys.stderr)
    return 1
  return 0


def experts_series(args) -> int:
  """One process per E (all of quick's in one), each timing dense, sparse and the dense model side by side."""
  import bench_train_experts as bx
  tokens = bx.QUICK_TOKENS if args.quick else bx.TOKENS
  grid = bx.experts_grid(tokens['batch'] * tokens['seq_len'] * bx.K, args.quick)
  steps = args.steps or (3 if args.quick else 15)
  env = dict(os.environ, JAX_PLATFORMS=args.device, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  rows = []
  for group in ([grid] if args.quick else [[e] for e in grid]):
    cmd = [sys.executable, __file__, '--worker', '--series', 'experts', '--steps', str(steps),
           '--experts', ','.join(map(str, group))] + (['--quick'] if args.quick else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
      err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit {r.returncode}'
      rows += [{'series': 'experts', 'update': u, 'experts': e, 'step_seconds': None, 'error': err}
               for e in group for u in bx.UPDATES]
    else:
      rows += json.loads(r.stdout.strip().splitlines()[-1])
    for row in rows[-3 * len(group):]:
      print(f"E={row['experts']:6d} {row['update']:11s} " +
            (f"{row['step_seconds'] * 1e3:8.1f} ms  peak {row['peak_bytes'] / 1e6:7.1f} MB  optimizer "
             f"{row['optimizer_bytes_per_step'] / 1e6:7.1f} MB/step  (compiles: {row['compiles']})"
             if row.get('step_seconds') else f"FAILED {row.get('error')}"), flush=True)
  machine = {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'platform': args.device}
  for r in rows:
    r['machine'] = machine
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'bench_train_experts.json').write_text(json.dumps(rows, indent=1))
  ok = [r for r in rows if r.get('step_seconds')]
  summ = bx.summary(ok) if ok else {}
  (out / 'bench_train_experts_summary.json').write_text(json.dumps(summ, indent=1))
  if ok:
    bx.plot(ok, out / 'bench_train_experts.png')
  print(json.dumps({k: summ.get(k) for k in ('sparse_step_max_over_min', 'sparse_over_dense_model_max',
                                              'dense_step_max_over_min', 'sparse_optimizer_bytes_max_over_min',
                                              'pass')}))
  print(f'wrote {out / "bench_train_experts.json"}')
  bad = [r for r in rows if r.get('compiles') != 1]
  if bad:
    print(f'a train step failed or recompiled: {[(r["experts"], r["update"]) for r in bad]}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
