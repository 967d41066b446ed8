"""Renders README's Performance tables (markdown) from bench_moe.json and bench_train.json.

    python experiments/perf_table.py experiments/results
"""
from __future__ import annotations

import json
import pathlib
import sys


def moe_table(rows: list[dict], series: str = 'main') -> str:
  """impl x E cells 'time (ratio to dense)' for one series of rows ('main' or 'tokens')."""
  rows = [r for r in rows if r.get('series', 'main') == series]
  experts = sorted({r['experts'] for r in rows})
  impls = list(dict.fromkeys(r['impl'] for r in rows))
  head = '| impl | ' + ' | '.join(f'E = {e}' for e in experts) + ' |'
  lines = [head, '|---' * (len(experts) + 1) + '|']
  for impl in impls:
    cells = []
    for e in experts:
      r = next((x for x in rows if x['impl'] == impl and x['experts'] == e), None)
      if r is None:
        cells.append('')
      elif r.get('median_seconds') is None:
        err = r.get('error') or ''
        cells.append('skipped' if err.startswith('skipped') else 'not installed' if 'not installed' in err else 'failed')
      else:
        cells.append(f"{r['median_seconds'] * 1e3:.1f} ms ({r['ratio_to_dense']:.2f}×)")
    lines.append(f'| {impl} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def train_table(rows: list[dict]) -> str:
  lines = ['| config | model | devices | tokens/s | × dense | compiles |', '|---|---|---|---|---|---|']
  for r in rows:
    tps = f"{r['tokens_per_second']:,.0f}" if r.get('tokens_per_second') else 'failed'
    ratio = f"{r['ratio_to_dense']:.2f}" if r.get('ratio_to_dense') else ''
    lines.append(f"| {r['config']} | {r['model']} | {r['devices']} | {tps} | {ratio} | {r.get('compiles', '')} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  d = pathlib.Path((argv or sys.argv[1:] or ['experiments/results'])[0])
  moe_rows = json.loads((d / 'bench_moe.json').read_text())
  print(moe_table(moe_rows))
  if any(r.get('series') == 'tokens' for r in moe_rows):
    print()
    print(moe_table(moe_rows, 'tokens'))
  print()
  print(train_table(json.loads((d / 'bench_train.json').read_text())))
  return 0


if __name__ == '__main__':
  sys.exit(main())
