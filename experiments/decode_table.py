"""Renders docs/decoding.md's decoding table (markdown) from bench_decode.json and bench_decode_summary.json.

    python experiments/decode_table.py experiments/results
"""
from __future__ import annotations

import json
import pathlib
import sys


def decode_table(rows: list[dict]) -> str:
  """One row per (batch, model): ms per token, tokens/s, × dense, bytes/token, predicted ms and its ratio."""
  lines = ['| batch | model | experts/layer | ms/token | tokens/s | × dense | bytes accessed/token | '
           'expert bytes/token | predicted ms/token (pred/meas) |',
           '|---|---|---|---|---|---|---|---|---|']
  for b in sorted({r['batch'] for r in rows}):
    dense = next(r for r in rows if r['batch'] == b and r['impl'] == 'dense')
    for r in sorted((r for r in rows if r['batch'] == b), key=lambda r: (r['impl'] != 'dense', r['experts'])):
      experts = '—' if r['impl'] == 'dense' else f"{r['experts']:,}"
      lines.append(f"| {b} | {r['impl']} | {experts} | {r['ms_per_token']:.2f} | {r['tokens_per_second']:,.0f} | "
                   f"{r['ms_per_token'] / dense['ms_per_token']:.2f} | {r['bytes_accessed_per_token'] / 1e6:.2f} MB | "
                   f"{r['expert_weight_bytes_per_token'] / 1e3:.0f} kB | "
                   f"{r['predicted_ms_per_token']:.2f} ({r['predicted_over_measured']:.2f}) |")
  return '\n'.join(lines)


def targets_line(summary: dict) -> str:
  b1, t = summary['batch_1'], summary['targets']
  ok = summary['pass']
  return (f"batch 1 targets: MoE/dense max {b1['moe_over_dense_max']:.2f} (target ≤ {t['moe_over_dense_max']}: "
          f"{'met' if ok['moe_over_dense_max'] else 'MISSED'}); max/min over E "
          f"{b1['max_over_min_over_experts']:.2f} (≤ {t['max_over_min_over_experts']}: "
          f"{'met' if ok['max_over_min_over_experts'] else 'MISSED'}); bytes/token max/min over E "
          f"{b1['bytes_max_over_min']:.3f} (≤ {t['bytes_max_over_min']}: {'met' if ok['bytes_max_over_min'] else 'MISSED'})")


def main(argv=None) -> int:
  d = pathlib.Path((argv or sys.argv[1:] or ['experiments/results'])[0])
  print(decode_table(json.loads((d / 'bench_decode.json').read_text())))
  print()
  print(targets_line(json.loads((d / 'bench_decode_summary.json').read_text())))
  return 0


if __name__ == '__main__':
  sys.exit(main())
