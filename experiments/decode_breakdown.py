"""Where a decode step's time goes, for a few bench_decode rows (issue 12's latency model at decode):

  (a) loop      the generation loop's measured seconds per step (litejax.inference.decode.generate's step_s)
  (b) step      the jitted decode step alone, called in a tight loop with prepared arguments and
                block_until_ready (through jax.jit's dispatch of every argument leaf)
  empty         a jitted call with the same argument leaves and no work: dispatch alone
  host pieces   the loop's other calls into the runtime per step: the batch-sharded positions
                (device_put), the step index (a NumPy scalar, replicated device_put), the next
                tokens back to the host (device_get)
  (c) model     the latency model's prediction (litejax.analysis.decode_bound.report: compute, memory, per-kernel
                overhead and the host term = decode.HOST_CALLS_PER_STEP x call_overhead_s)

Each round times every piece of a row once, after one round of litejax.perf.host's probes
(measure_host(between=...)): on a shared machine the host chip and the row are measured
under the same load; medians over the rounds. `cpu_share` is process CPU seconds / wall seconds over
the rounds' loop runs (below 1 when other work takes the cores).

    python experiments/decode_breakdown.py --out /tmp/breakdown [--rows 0,1,5]
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import harness

# (impl, experts per layer, batch): batch 1 and 16, small and large E, MoE and dense
ROWS = [('dense', None, 1), ('moe', 16, 1), ('moe', 4096, 1), ('moe', 16384, 1), ('dense', None, 16),
        ('moe', 16, 16), ('moe', 16384, 16)]


def _pieces(rt, params, extra, args):
  """{name: a call to time} for the row's runtime: the step, dispatch, host calls."""
  import jax
  import numpy as np

  from litejax.inference import decode
  from litejax.model import kv_cache
  batch = rt.batch
  key, samp = rt.replicated((jax.random.key(0), decode.Sampling().as_arrays()))
  tok, pos = rt.rows(np.zeros(batch)), rt.rows(np.full(batch, args.prompt_len))
  idx = rt.replicated(np.int32(1))
  state = {'cache': kv_cache.init_cache(rt.cfg, rt.mesh, batch, rt.max_len)}
  other_cache = kv_cache.init_cache(rt.cfg, rt.mesh, batch, rt.max_len)
  noop = jax.jit(lambda p, e, c, t, q, k, i, s: t)
  lengths = np.full(batch, args.prompt_len, np.int32)

  def step():
    nb, _, state['cache'] = rt.step(params, extra, state['cache'], tok, pos, key, idx, samp)
    jax.block_until_ready(nb)

  return {
      'step': step,
      'empty': lambda: jax.block_until_ready(noop(params, extra, other_cache, tok, pos, key, idx, samp)),
      'rows_put': lambda: jax.block_until_ready(rt.rows(lengths + 3)),
      'index_put': lambda: jax.block_until_ready(rt.replicated(np.int32(3))),
      'device_get': lambda: np.asarray(jax.device_get(tok)),
  }


def measure_row(name, experts, batch, args) -> dict:
  import jax

  from litejax.inference import decode
  from litejax.perf.host import measure_host
  from litejax.perf.timing import time_calls
  row = harness.decode_row(experts, batch, args.prompt_len, args.new_tokens)
  rt, prompts = row.runtime, row.prompts
  with jax.set_mesh(row.mesh):
    params, extra = rt.place(row.params, row.extra)
    pieces = _pieces(rt, params, extra, args)
    decode.generate(rt, params, extra, prompts, 2)
    for f in pieces.values():
      f()
    runs = {k: [] for k in ['loop', 'cpu_share', *pieces]}

    def one_round():
      gen, share = harness.cpu_share(lambda: decode.generate(rt, params, extra, prompts, args.new_tokens))
      runs['loop'].append(statistics.median(gen.step_s))
      runs['cpu_share'].append(share)
      for k, f in pieces.items():
        runs[k].append(statistics.median(time_calls(f, args.calls, warmup=0)))

    chip = measure_host(repeats=args.rounds, between=one_round)
  med = {k: statistics.median(v) for k, v in runs.items()}
  lat = row.bound_report(chip)['latency']
  out = {'impl': name, 'experts': experts or 0, 'batch': batch, 'cpu_share': med.pop('cpu_share')}
  out.update({f'{k}_ms': 1e3 * v for k, v in med.items()})
  out['loop_minus_step_ms'] = out['loop_ms'] - out['step_ms']
  out['host_calls_ms'] = out['rows_put_ms'] + out['index_put_ms'] + out['device_get_ms'] + out['empty_ms']
  out['model_ms'] = {k[:-2]: 1e3 * lat[k] for k in ('compute_s', 'memory_s', 'overhead_s', 'host_s', 'total_s')}
  out['model_kernels'] = lat['kernels']
  out['model_device_ms'] = out['model_ms']['total'] - out['model_ms']['host']
  out['predicted_over_loop'] = lat['predicted_ms_per_token'] / out['loop_ms']
  out['model_device_over_step'] = out['model_device_ms'] / (out['step_ms'] - out['empty_ms'])
  out['host'] = {k: getattr(chip, k) for k in ('peak_flops', 'hbm_bytes_per_s', 'transpose_bytes_per_s',
                                               'kernel_overhead_s', 'call_overhead_s')}
  return out


def main(argv=None) -> int:
  p = harness.parser(__doc__)
  p.add_argument('--rows', default='', help='comma-separated indices into ROWS (default all)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--calls', type=int, default=20, help='timed calls per piece per round (median kept)')
  p.add_argument('--new-tokens', type=int, default=24)
  p.add_argument('--prompt-len', type=int, default=16)
  args = p.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  rows = [ROWS[int(i)] for i in args.rows.split(',')] if args.rows else ROWS
  res = []
  for name, e, b in rows:
    res.append(measure_row(name, e, b, args))
    print(json.dumps(res[-1]), flush=True)
  harness.write_json(harness.out_dir(args.out), 'decode_breakdown.json',
                     {'rows': res, 'load_average': os.getloadavg()})
  return 0


if __name__ == '__main__':
  sys.exit(main())
