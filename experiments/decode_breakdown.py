"""Where a decode step's time goes, for a few bench_decode rows (issue 12's latency model at decode):

  (a) loop      the generation loop's measured seconds per step (litejax.decode.generate's step_s)
  (b) step      the jitted decode step alone, called in a tight loop with prepared arguments and
                block_until_ready (still through jax.jit's dispatch of every argument leaf)
  (b0) exec     the compiled step's device time alone, with host dispatch priced apart: (b) less
                one dispatch of a jitted call with the same argument leaves and no work
  host pieces   each piece of per-step host work the loop does beside the call: the batch-sharded
                positions (device_put), the step index (replicated device_put), the next tokens
                back to the host (device_get)
  (c) model     the latency model's prediction of the step (decode_cost.report on the measured host)

Every row's measurements are interleaved round by round (the machine may be shared).

    python experiments/decode_breakdown.py --out /tmp/breakdown
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'experiments'))

ROWS = [('dense', None, 1), ('moe', 16, 1), ('moe', 4096, 1), ('moe', 16384, 1), ('dense', None, 16),
        ('moe', 16, 16), ('moe', 16384, 16)]


def _median(f, n: int) -> float:
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def measure_row(name, experts, batch, args, chip) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import bench_decode
  from litejax import decode, decode_cost, sharding
  from litejax.config import load_config
  from litejax.model import init_model
  cfg = load_config(REPO / 'configs' / 'tiny.yaml', bench_decode.overrides(experts))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  max_len = args.prompt_len + args.new_tokens
  rt = decode.make_runtime(cfg, mesh, batch, max_len)
  _, params, extra = nnx.split(init_model(cfg, seed=0), nnx.Param, ...)
  prompts = [[(7 * i + 3 * j) % 256 for j in range(args.prompt_len)] for i in range(batch)]
  out = {'impl': name, 'experts': experts or 0, 'batch': batch}
  with jax.set_mesh(mesh):
    params, extra = rt.place(params, extra)
    decode.generate(rt, params, extra, prompts, 2)
    key, samp = rt.replicated((jax.random.key(0), decode.Sampling().as_arrays()))
    cache = decode.init_cache(cfg, mesh, batch, max_len)
    tok = rt.rows(np.zeros(batch))
    pos = rt.rows(np.full(batch, args.prompt_len))
    idx = rt.replicated(jnp.int32(1))
    state = {'cache': cache}

    def step():
      nb, _, state['cache'] = rt.step(params, extra, state['cache'], tok, pos, key, idx, samp)
      jax.block_until_ready(nb)

    # A jitted call with the same argument leaves and no work: what dispatch alone costs.
    noop = jax.jit(lambda p, e, c, t, q, k, i, s: t)
    other_cache = decode.init_cache(cfg, mesh, batch, max_len)

    def empty():
      jax.block_until_ready(noop(params, extra, other_cache, tok, pos, key, idx, samp))

    lengths = np.full(batch, args.prompt_len, np.int32)
    pieces = {'rows_put': lambda: jax.block_until_ready(rt.rows(lengths + 3)),
              'index_put': lambda: jax.block_until_ready(rt.replicated(jnp.int32(3))),
              'device_get': lambda: np.asarray(jax.device_get(tok))}
    def gapped():
      # the step timed alone after an untimed pause of host work, as in the loop (the runtime's
      # worker threads may sleep in between)
      t_end = time.perf_counter() + args.gap_us * 1e-6
      while time.perf_counter() < t_end:
        pass
      t0 = time.perf_counter()
      step()
      return time.perf_counter() - t0

    for f in [step, empty, gapped, *pieces.values()]:
      f()
    runs = {k: [] for k in ['loop', 'step', 'step_after_gap', 'empty', *pieces]}
    for _ in range(args.rounds):
      gen = decode.generate(rt, params, extra, prompts, args.new_tokens)
      runs['loop'].append(statistics.median(gen.step_s))
      runs['step'].append(_median(step, args.calls))
      runs['empty'].append(_median(empty, args.calls))
      runs['step_after_gap'].append(statistics.median(gapped() for _ in range(args.calls)))
      for k, f in pieces.items():
        runs[k].append(_median(f, args.calls))
  med = {k: 1e3 * statistics.median(v) for k, v in runs.items()}
  rep = decode_cost.report(decode_cost.compile_step(cfg, batch=batch, cache_len=max_len, mesh=mesh), chip)
  lat = rep['latency']
  out.update({f'{k}_ms': v for k, v in med.items()})
  out['exec_ms'] = med['step'] - med['empty']
  out['host_pieces_ms'] = med['rows_put'] + med['index_put'] + med['device_get']
  out['loop_minus_step_ms'] = med['loop'] - med['step']
  out['model'] = {k: lat[k] * 1e3 for k in ('compute_s', 'memory_s', 'overhead_s', 'total_s') if k in lat}
  out['model'].update({k: lat[k] for k in lat if k.endswith('kernels') or k == 'call_overhead_s'})
  out['predicted_ms_per_token'] = lat['predicted_ms_per_token']
  out['predicted_over_loop'] = lat['predicted_ms_per_token'] / med['loop']
  out['leaves'] = len(jax.tree.leaves((params, extra, cache)))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True)
  p.add_argument('--rows', default='', help='comma-separated row indices of ROWS (default all)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--calls', type=int, default=20)
  p.add_argument('--new-tokens', type=int, default=24)
  p.add_argument('--prompt-len', type=int, default=16)
  p.add_argument('--gap-us', type=float, default=300, help='host pause before each gapped step')
  args = p.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from litejax import decode_cost
  chip = decode_cost.host_chip()
  rows = [ROWS[int(i)] for i in args.rows.split(',')] if args.rows else ROWS
  res = []
  for name, e, b in rows:
    r = measure_row(name, e, b, args, chip)
    res.append(r)
    print(json.dumps(r), flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'decode_breakdown.json').write_text(json.dumps({'host': chip.as_dict(), 'rows': res}, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
