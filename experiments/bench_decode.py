"""Per-token decode latency: the MoE at fixed active parameters with 16 .. 16384 experts per layer,
beside the dense model with the same active parameters, at batch 1 and 16 (one CPU device).

    python experiments/bench_decode.py --out experiments/results            # the README table
    python experiments/bench_decode.py --quick --out /tmp/bench              # tests: E = 16, batch 1, untimed

Each model decodes greedily through litejax.inference.decode (KV cache, dropless routing) from random weights;
ms_per_token is the median decode step (every row gets one token per step) of the run with the median
median of `--repeats`. Beside it, from the same step compiled from abstract shapes
(litejax.analysis.decode_bound): bytes accessed per token (the HLO walker), the bytes read from the expert
tables, and the latency model's prediction (decode_cost.predict) on this host as
litejax.perf.host's probes measure it, the probes' rounds interleaved with the row's runs: the
machine may be shared, and host and step are then measured under the same load. Each row also
carries `cpu_share` (process CPU seconds / wall seconds over its runs; up to the 2 threads XLA:CPU
uses here, well below 1 when other work takes the cores) and the load average. Writes OUT/bench_decode.json
(rows), OUT/bench_decode_summary.json (the targets) and OUT/bench_decode.png. The decode step must
compile once per (batch, max_len): asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Every model has configs/tiny.yaml's dims with layers unrolled (a layer scan slices each layer's whole
# expert table before the gather: `litejax bound --decode` reports it) and K = 4 routed experts.
# experts per layer -> routing (tiers x groups x experts per group, k at each level); K = 4 always.
ROUTING = {
    16: ['moe.num_tiers=1', 'moe.groups_per_tier=1', 'moe.experts_per_group=16', 'moe.k_group=1'],
    256: ['moe.num_tiers=1', 'moe.groups_per_tier=16', 'moe.experts_per_group=16', 'moe.k_group=1'],
    4096: ['moe.num_tiers=16', 'moe.groups_per_tier=16', 'moe.experts_per_group=16', 'moe.k_group=1'],
    16384: ['moe.num_tiers=16', 'moe.groups_per_tier=16', 'moe.experts_per_group=64', 'moe.k_group=1'],
}
TARGETS = {'moe_over_dense_max': 1.5, 'max_over_min_over_experts': 1.3, 'bytes_max_over_min': 1.1}


def overrides(experts: int | None) -> list[str]:
  base = ['model.scan_layers=false', 'mesh.data=1']
  if experts is None:   # dense: every layer a GLU FFN of K·h + shared hidden units (bench_train's rule)
    return base + ['model.moe_every=0', 'model.d_ff=256', 'model.ffn_kind=glu']
  return base + ROUTING[experts] + ['moe.k_tier=1', 'moe.k_expert=4']


def run_one(name: str, experts: int | None, batch: int, args) -> tuple[dict, object]:
  """(the row, the host chip measured interleaved with its runs)."""
  import jax
  from flax import nnx

  from litejax.model import bounds
  from litejax.perf.host import measure_host
  from litejax.inference import decode
  from litejax.analysis import decode_bound
  from litejax import sharding
  from litejax.config import load_config
  from litejax.model.transformer import init_model
  cfg = load_config(REPO / 'configs' / 'tiny.yaml', overrides(experts))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  max_len = args.prompt_len + args.new_tokens
  rt = decode.make_runtime(cfg, mesh, batch, max_len)
  _, params, extra = nnx.split(init_model(cfg, seed=0), nnx.Param, ...)
  prompts = [[(7 * i + 3 * j) % 256 for j in range(args.prompt_len)] for i in range(batch)]
  with jax.set_mesh(mesh):
    decode.generate(rt, params, extra, prompts, 2)                  # compile prefill + step
    runs, cpu = [], []

    def timed_run():
      # process CPU seconds / wall seconds of the run: below the threads the step can use when other
      # work on the machine takes cores from it (a loaded machine, said beside the figures)
      w0, c0 = time.perf_counter(), time.process_time()
      runs.append(decode.generate(rt, params, extra, prompts, args.new_tokens))
      cpu.append((time.process_time() - c0) / (time.perf_counter() - w0))

    chip = measure_host(repeats=args.repeats, quick=args.quick, between=timed_run)
    gen = sorted(runs, key=lambda g: statistics.median(g.step_s))[len(runs) // 2]
  if gen.compiles != 1:
    raise AssertionError(f'{name} batch {batch}: the decode step compiled {gen.compiles} times')
  rep = decode_bound.report(decode_bound.compile_step(cfg, batch=batch, cache_len=max_len, mesh=mesh), chip)
  ms = 1e3 * statistics.median(gen.step_s)
  pc = bounds.param_counts(cfg)
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
          'compiles': gen.compiles, 'violations': rep['violations'],
          'host': {'peak_flops': chip.peak_flops, 'mem_bytes_per_s': chip.hbm_bytes_per_s,
                   'transpose_bytes_per_s': chip.transpose_bytes_per_s,
                   'kernel_overhead_s': chip.kernel_overhead_s, 'call_overhead_s': chip.call_overhead_s,
                   'gather_bytes_per_s': chip.gather_bytes_per_s, 'sort_comparison_s': chip.sort_comparison_s}}, chip


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


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
  for b, color in zip(sorted({r['batch'] for r in rows}), ('C0', 'C1', 'C2')):
    moe = sorted((r for r in rows if r['impl'] == 'moe' and r['batch'] == b), key=lambda r: r['experts'])
    dense = next(r for r in rows if r['impl'] == 'dense' and r['batch'] == b)
    e = [r['experts'] for r in moe]
    ax.plot(e, [r['ms_per_token'] for r in moe], 'o-', color=color, label=f'MoE, batch {b}')
    ax.plot(e, [r['predicted_ms_per_token'] for r in moe], 'x:', color=color, label=f'predicted, batch {b}')
    ax.axhline(dense['ms_per_token'], color=color, ls='--', label=f'dense, batch {b}')
    bx.plot(e, [r['bytes_accessed_per_token'] / 1e6 for r in moe], 'o-', color=color, label=f'batch {b}')
  for a in (ax, bx):
    a.set_xscale('log', base=2)
    a.set_xlabel('experts per layer (same active parameters)')
    a.legend(fontsize=7)
  ax.set_ylabel('ms per decode step (one token per row)')
  bx.set_ylabel('bytes accessed per token (MB, compiled HLO)')
  bx.set_ylim(bottom=0)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True)
  p.add_argument('--quick', action='store_true', help='E = 16 and batch 1 only, few tokens (tests; untimed)')
  p.add_argument('--new-tokens', type=int, default=0)
  p.add_argument('--prompt-len', type=int, default=16)
  p.add_argument('--repeats', type=int, default=0,
                 help='timed runs per row, each after a round of host probes; the median run kept (default 3; quick 1)')
  args = p.parse_args(argv)
  args.new_tokens = args.new_tokens or (3 if args.quick else 48)
  args.repeats = args.repeats or (1 if args.quick else 3)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  experts = [16] if args.quick else list(ROUTING)
  rows = []
  # quick: batch 1 only (the targets' batch); batch 16 runs the same code, twice the compiles
  for batch in ((1,) if args.quick else (1, 16)):
    for e in [None] + experts:
      name = 'dense' if e is None else 'moe'
      r, chip = run_one(name, e, batch, args)
      r['machine'] = {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()}
      rows.append(r)
      print(f"{name:5s} E={r['experts']:6d} batch={batch:3d}  {r['ms_per_token']:7.3f} ms/token  "
            f"{r['tokens_per_second']:9.1f} tokens/s  bytes/token {r['bytes_accessed_per_token'] / 1e6:7.2f} MB  "
            f"predicted {r['predicted_ms_per_token']:.3f} ms ({r['predicted_over_measured']:.2f}), "
            f"CPU share {r['cpu_share']:.2f}", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'bench_decode.json').write_text(json.dumps(rows, indent=1))
  summary = summarize(rows)
  summary['host_last_row'] = {'peak_flops': chip.peak_flops, 'mem_bytes_per_s': chip.hbm_bytes_per_s,
                     'transpose_bytes_per_s': chip.transpose_bytes_per_s,
                     'kernel_overhead_s': chip.kernel_overhead_s, 'call_overhead_s': chip.call_overhead_s,
                     'gather_bytes_per_s': chip.gather_bytes_per_s, 'sort_comparison_s': chip.sort_comparison_s}
  (out / 'bench_decode_summary.json').write_text(json.dumps(summary, indent=1))
  plot(rows, out / 'bench_decode.png')
  print(json.dumps(summary['pass']))
  return 0


if __name__ == '__main__':
  sys.exit(main())
