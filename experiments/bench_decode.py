"""Per-token decode latency: the MoE at fixed active parameters with 16 .. 16384 experts per layer,
beside the dense model with the same active parameters, at batch 1 and 16 (one CPU device).

    python experiments/bench_decode.py --out experiments/results            # the docs/decoding.md table
    python experiments/bench_decode.py --quick --out /tmp/bench              # tests: E = 16, batch 1, untimed

Each model decodes greedily through litejax.inference.decode (KV cache, dropless routing) from random weights;
ms_per_token is the median decode step (every row gets one token per step) of the run with the median
median of `--repeats`. Beside it, from the same step compiled from abstract shapes
(litejax.analysis.decode_bound): bytes accessed per token (the HLO walker), the bytes read from the expert
tables, and the latency model's prediction (litejax.analysis.decode_bound.predict) on this host as
litejax.perf.host's probes measure it, the probes' rounds interleaved with the row's runs: the
machine may be shared, and host and step are then measured under the same load. Each row also
carries `cpu_share` (process CPU seconds / wall seconds over its runs; up to the 2 threads XLA:CPU
uses here, well below 1 when other work takes the cores) and the load average. Writes OUT/bench_decode.json
(rows), OUT/bench_decode_summary.json (the targets) and OUT/bench_decode.png. The decode step must
compile once per (batch, max_len): asserted.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import harness

TARGETS = {'moe_over_dense_max': 1.5, 'max_over_min_over_experts': 1.3, 'bytes_max_over_min': 1.1}


def host_facts(chip) -> dict:
  """The host chip's measured figures as the rows and the summary carry them."""
  return {'peak_flops': chip.peak_flops, 'mem_bytes_per_s': chip.hbm_bytes_per_s,
          'transpose_bytes_per_s': chip.transpose_bytes_per_s,
          'kernel_overhead_s': chip.kernel_overhead_s, 'call_overhead_s': chip.call_overhead_s,
          'gather_bytes_per_s': chip.gather_bytes_per_s, 'sort_comparison_s': chip.sort_comparison_s}


def run_one(name: str, experts: int | None, batch: int, args) -> tuple[dict, object]:
  """(the row, the host chip measured interleaved with its runs)."""
  import jax

  from litejax.inference import decode
  from litejax.model import bounds
  from litejax.perf.host import measure_host
  row = harness.decode_row(experts, batch, args.prompt_len, args.new_tokens)
  rt, params, extra, prompts = row.runtime, row.params, row.extra, row.prompts
  with jax.set_mesh(row.mesh):
    decode.generate(rt, params, extra, prompts, 2)                  # compile prefill + step
    runs, cpu = [], []

    def timed_run():
      gen, share = harness.cpu_share(lambda: decode.generate(rt, params, extra, prompts, args.new_tokens))
      runs.append(gen)
      cpu.append(share)

    chip = measure_host(repeats=args.repeats, quick=args.quick, between=timed_run)
    gen = sorted(runs, key=lambda g: statistics.median(g.step_s))[len(runs) // 2]
  if gen.compiles != 1:
    raise AssertionError(f'{name} batch {batch}: the decode step compiled {gen.compiles} times')
  rep = row.bound_report(chip)
  ms = 1e3 * statistics.median(gen.step_s)
  pc = bounds.param_counts(row.cfg)
  return {'impl': name, 'experts': experts or 0, 'batch': batch, 'ms_per_token': ms,
          'tokens_per_second': batch / (ms / 1e3), 'steps_timed': len(gen.step_s),
          'cpu_share': statistics.median(cpu), 'load_average': os.getloadavg()[0],
          'ms_per_token_p90': 1e3 * statistics.quantiles(gen.step_s, n=10)[-1] if len(gen.step_s) > 1 else ms,
          'bytes_accessed_per_token': rep['bytes_accessed_per_token'],
          'expert_weight_bytes_per_token': rep['expert_weight_bytes_per_token'],
          'flops_per_token_compiled': rep['flops_per_token_compiled'],
          'flops_per_token_analytic': rep['flops_per_token_analytic'],
          'predicted_ms_per_token': rep['latency']['predicted_ms_per_token'],
          'predicted_over_measured': rep['latency']['predicted_ms_per_token'] / ms,
          'predicted_dominant': rep['latency']['dominant'],
          'predicted_kernels': rep['latency']['kernels'],
          'predicted_overhead_ms': 1e3 * rep['latency']['overhead_s'],
          'predicted_host_ms': 1e3 * rep['latency']['host_s'],
          'params_total': pc.total, 'params_active_per_token': pc.active_per_token,
          'compiles': gen.compiles, 'violations': rep['violations'], 'host': host_facts(chip)}, chip


def summarize(rows: list[dict]) -> dict:
  """The targets at batch 1: MoE within 1.5x dense at every E, max/min over E <= 1.3, bytes flat in E."""
  out = {'targets': TARGETS}
  for b in sorted({r['batch'] for r in rows}):
    moe = [r for r in rows if r['impl'] == 'moe' and r['batch'] == b]
    dense = next(r for r in rows if r['impl'] == 'dense' and r['batch'] == b)
    ms = [r['ms_per_token'] for r in moe]
    by = [r['bytes_accessed_per_token'] for r in moe]
    out[f'batch_{b}'] = {
        'moe_over_dense': {str(r['experts']): r['ms_per_token'] / dense['ms_per_token'] for r in moe},
        'moe_over_dense_max': max(ms) / dense['ms_per_token'],
        'max_over_min_over_experts': max(ms) / min(ms),
        'bytes_max_over_min': max(by) / min(by),
        'predicted_over_measured': {f"{r['impl']}_{r['experts']}": r['predicted_over_measured']
                                    for r in moe + [dense]},
    }
  b1 = out.get('batch_1', {})
  out['pass'] = {k: b1.get(k, float('inf')) <= v for k, v in TARGETS.items()}
  return out


def plot(rows: list[dict], path) -> None:
  fig, (ax, bx) = harness.figure(2, figsize=(10, 4))
  for b, color in zip(sorted({r['batch'] for r in rows}), ('C0', 'C1', 'C2')):
    moe = sorted((r for r in rows if r['impl'] == 'moe' and r['batch'] == b), key=lambda r: r['experts'])
    dense = next(r for r in rows if r['impl'] == 'dense' and r['batch'] == b)
    e = [r['experts'] for r in moe]
    ax.plot(e, [r['ms_per_token'] for r in moe], 'o-', color=color, label=f'MoE, batch {b}')
    ax.plot(e, [r['predicted_ms_per_token'] for r in moe], 'x:', color=color, label=f'predicted, batch {b}')
    ax.axhline(dense['ms_per_token'], color=color, ls='--', label=f'dense, batch {b}')
    bx.plot(e, [r['bytes_accessed_per_token'] / 1e6 for r in moe], 'o-', color=color, label=f'batch {b}')
  xlabel = 'experts per layer (same active parameters)'
  harness.style(ax, xlabel, 'ms per decode step (one token per row)', xlog=2)
  harness.style(bx, xlabel, 'bytes accessed per token (MB, compiled HLO)', xlog=2)
  bx.set_ylim(bottom=0)
  harness.save(fig, path)


def main(argv=None) -> int:
  p = harness.parser(__doc__, quick='E = 16 and batch 1 only, few tokens (tests; untimed)', repeats=0,
                     repeats_help='timed runs per row, each after a round of host probes; the median run kept '
                                  '(default 3; quick 1)')
  p.add_argument('--new-tokens', type=int, default=0)
  p.add_argument('--prompt-len', type=int, default=16)
  args = p.parse_args(argv)
  args.new_tokens = args.new_tokens or (3 if args.quick else 48)
  args.repeats = args.repeats or (1 if args.quick else 3)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  experts = [16] if args.quick else list(harness.DECODE_ROUTING)
  rows = []
  # quick: batch 1 only (the targets' batch); batch 16 runs the same code, twice the compiles
  for batch in ((1,) if args.quick else (1, 16)):
    for e in [None] + experts:
      name = 'dense' if e is None else 'moe'
      r, chip = run_one(name, e, batch, args)
      r['machine'] = harness.machine()
      rows.append(r)
      print(f"{name:5s} E={r['experts']:6d} batch={batch:3d}  {r['ms_per_token']:7.3f} ms/token  "
            f"{r['tokens_per_second']:9.1f} tokens/s  bytes/token {r['bytes_accessed_per_token'] / 1e6:7.2f} MB  "
            f"predicted {r['predicted_ms_per_token']:.3f} ms ({r['predicted_over_measured']:.2f}), "
            f"CPU share {r['cpu_share']:.2f}", flush=True)
  out = harness.out_dir(args.out)
  harness.write_json(out, 'bench_decode.json', rows)
  summary = summarize(rows)
  summary['host_last_row'] = host_facts(chip)
  harness.write_json(out, 'bench_decode_summary.json', summary)
  plot(rows, out / 'bench_decode.png')
  print(json.dumps(summary['pass']))
  return 0


if __name__ == '__main__':
  sys.exit(main())
