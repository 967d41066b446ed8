"""Renders docs/performance.md's tables (markdown) from bench_moe.json and bench_train.json, and the
"Sparse expert updates" table from bench_train_experts.json (when present).

    python experiments/perf_table.py experiments/results
    python experiments/perf_table.py experiments/results --experts     # only the experts series table
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


def experts_table(rows: list[dict]) -> str:
  """E x (dense update, sparse update, dense model): median step time, peak memory, temporaries and the
  optimizer's bytes accessed per step."""
  by = {(r['experts'], r['update']): r for r in rows if r.get('series') == 'experts'}
  experts = sorted({e for e, _ in by})
  nk = next(iter(by.values()))['nk'] if by else 0
  lines = ['| E / layer | E / N·K | dense update | sparse update | dense model | sparse ÷ dense model | '
           'peak MB dense / sparse | temporaries MB dense / sparse | optimizer MB/step dense / sparse |',
           '|---' * 9 + '|']
  ms = lambda r: f"{r['step_seconds'] * 1e3:.1f} ms" if r and r.get('step_seconds') else 'failed'  # noqa: E731
  mb = lambda r, k: f"{r[k] / 1e6:.1f}" if r and r.get(k) is not None else '-'  # noqa: E731
  for e in experts:
    d, s, m = by.get((e, 'dense')), by.get((e, 'sparse')), by.get((e, 'dense_model'))
    both = s and m and s.get('step_seconds') and m.get('step_seconds')
    ratio = f"{s['step_seconds'] / m['step_seconds']:.2f}×" if both else ''
    pair = lambda k: f'{mb(d, k)} / {mb(s, k)}'  # noqa: E731
    lines.append(f"| {e:,} | {e / nk:g} | {ms(d)} | {ms(s)} | {ms(m)} | {ratio} | {pair('peak_bytes')} | "
                 f"{pair('temp_bytes')} | {pair('optimizer_bytes_per_step')} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  args = list(argv if argv is not None else sys.argv[1:])
  only_experts = '--experts' in args
  args = [a for a in args if a != '--experts']
  d = pathlib.Path((args or ['experiments/results'])[0])
  experts = d / 'bench_train_experts.json'
  if only_experts:
    print(experts_table(json.loads(experts.read_text())))
    return 0
  moe_rows = json.loads((d / 'bench_moe.json').read_text())
  print(moe_table(moe_rows))
  if any(r.get('series') == 'tokens' for r in moe_rows):
    print()
    print(moe_table(moe_rows, 'tokens'))
  print()
  print(train_table(json.loads((d / 'bench_train.json').read_text())))
  if experts.exists():
    print()
    print(experts_table(json.loads(experts.read_text())))
  return 0


if __name__ == '__main__':
  sys.exit(main())
