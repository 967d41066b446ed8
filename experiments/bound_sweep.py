"""Compiled FLOPs per token against SPEC-006's bound, one config axis at a time.

  python experiments/bound_sweep.py --axis experts --quick --out runs/bound_sweep
  python experiments/bound_sweep.py --axis all --out runs/bound_sweep

Every point is compiled (forward pass, one CPU device, abstract inputs: nothing is allocated, so a
million experts per layer compile in seconds) and read by `litejax.analysis.bound.report`, i.e. the numbers are
the optimized HLO's, attributed to components, not the analytic model's.

Axes (a small model: d = 32, one layer, S = 32, V = 64, h = 16, K = 2, so each compile takes ~1-3 s):
  experts   experts per layer 8 -> 2^20, grown through tiers and groups (T·G·E_g, K fixed), series:
              gather       fixed dispatch path: FLOPs/token outside the router must stay flat (< 1%),
                           the router must grow only as 2·d·(T + k_tier·G + k_tier·k_group·E_g);
              auto         what a config runs by default: never above the (padded) bound;
              flat_router  T = G = 1, E_g = E (capped at 2^14): the router grows as 2·d·E;
              capacity     the [E, C, d] buffer at any E (capped): padding grows once C rounds up to 1;
              einsum       the GShard one-hot baseline (capped at 1024): dispatch grows with E.
  d_model   d doubling: attention projections ×4, experts ×2 (heads fixed, so head_dim = d / 2).
  d_expert  h: expert FLOPs linear in h.
  layers    L (scanned; unrolled alongside for small L): FLOPs linear in L, scan == unrolled.
  k         k_expert: expert FLOPs linear in K.
  tiers     T: only the tier router (2·d·T) grows.

Writes DIR/bound_sweep.json (one row per compiled point), DIR/bound_sweep_summary.json (the
headline numbers and the checks behind them) and DIR/bound_sweep_<axis>.png. Exit status 1 when a
check fails. A point whose config resolves to a program already compiled (e.g. `auto` that resolves
to `gather`) reuses that compile: the dispatch path is resolved before anything is traced, so the
program is the same; its row says so (`reused_compile`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import harness

AXES = ('experts', 'd_model', 'd_expert', 'layers', 'k', 'tiers')
BASE = ['model.d_model=32', 'model.num_layers=1', 'model.num_heads=2', 'model.num_kv_heads=2',
        'model.seq_len=32', 'model.vocab_size=64', 'model.ffn_kind=mlp', 'moe.d_expert=16',
        'moe.expert_kind=mlp', 'moe.num_tiers=2', 'moe.groups_per_tier=2', 'moe.experts_per_group=4',
        'moe.k_tier=1', 'moe.k_group=1', 'moe.k_expert=2', 'moe.dispatch=gather']
ROUTER = ('router_tier', 'router_group', 'router_expert')
FLAT_ROUTER_MAX = 2 ** 14      # a flat router over more experts compiles slowly and proves nothing new
EINSUM_MAX = 1024              # one-hot [N, E, C] tensors
CAPACITY_MAX = 4096
# axes whose expert FLOPs are linear in the swept size: (summary key, the row's size field, its symbol)
LINEAR_IN = {'d_expert': ('experts_per_h', 'value', 'h'), 'k': ('experts_per_k', 'k_active', 'K')}


def hierarchy(experts: int) -> tuple[int, int, int]:
  """(T, G, E_g) with T·G·E_g = experts (a power of two), balanced, E_g >= 8 where possible."""
  b = int(math.log2(experts))
  if 2 ** b != experts:
    raise ValueError(f'experts per layer must be a power of two, got {experts}')
  eg = min(b, max(3, math.ceil(b / 3)))
  g = math.ceil((b - eg) / 2)
  return 2 ** (b - eg - g), 2 ** g, 2 ** eg


def moe_shape(t: int, g: int, eg: int) -> list[str]:
  """The overrides of T tiers x G groups per tier x E_g experts per group."""
  return [f'moe.num_tiers={t}', f'moe.groups_per_tier={g}', f'moe.experts_per_group={eg}']


def points(axis: str, quick: bool) -> list[tuple[str, int, list[str]]]:
  """(series, swept value, config overrides) of every point of an axis."""
  out = []
  if axis == 'experts':
    es = [8, 64, 512, 4096, 2 ** 16, 2 ** 20] if quick else [2 ** b for b in range(3, 21, 2)] + [2 ** 20]
    for series, dispatch, cap in (('gather', 'gather', None), ('auto', 'auto', None),
                                  ('flat_router', 'gather', FLAT_ROUTER_MAX),
                                  ('capacity', 'capacity', 512 if quick else CAPACITY_MAX),
                                  ('einsum', 'einsum', 512 if quick else EINSUM_MAX)):
      for e in es + ([cap] if cap and cap not in es else []):
        if cap and e > cap:
          continue
        shape = (1, 1, e) if series == 'flat_router' else hierarchy(e)
        out.append((series, e, moe_shape(*shape) + [f'moe.dispatch={dispatch}']))
    out.sort(key=lambda p: (p[0], p[1]))
  elif axis == 'd_model':
    for d in ([32, 64, 128] if quick else [32, 64, 128, 256]):
      out.append(('gather', d, [f'model.d_model={d}']))
  elif axis == 'd_expert':
    for h in ([16, 32, 64] if quick else [16, 32, 64, 128, 256]):
      out.append(('gather', h, [f'moe.d_expert={h}']))
  elif axis == 'layers':
    for n in ([1, 2, 4] if quick else [1, 2, 4, 8, 16]):
      out.append(('scanned', n, [f'model.num_layers={n}', 'model.scan_layers=true']))
    for n in ([1, 2] if quick else [1, 2, 4]):
      out.append(('unrolled', n, [f'model.num_layers={n}']))
  elif axis == 'k':
    for k in ([1, 2, 4] if quick else [1, 2, 4, 8]):
      out.append(('gather', k, moe_shape(2, 2, 8) + [f'moe.k_expert={k}']))
  elif axis == 'tiers':
    for t in ([1, 4, 16] if quick else [1, 2, 4, 8, 16, 64]):
      out.append(('gather', t, moe_shape(t, 2, 4)))
  else:
    raise ValueError(f'unknown axis {axis!r} (known: {AXES})')
  return out


def _program_key(cfg, tokens_per_group: int):
  """Configs that compile to the same program: `auto` is resolved to its path before tracing."""
  from litejax.model.moe.capacity import resolve_dispatch
  moe = dataclasses.replace(cfg.moe, dispatch=resolve_dispatch(cfg.moe, tokens_per_group))
  return cfg.replace(moe=moe)


def measure(series: str, axis: str, value: int, overrides: list[str], cache: dict | None = None,
            tol: float = 0.03) -> dict:
  """Compiles one point (forward, one device) and returns its row."""
  from litejax.model import bounds
  from litejax.analysis import bound as bound_report
  from litejax.config import load_config
  cfg = load_config(harness.REPO / 'configs' / 'tiny.yaml', BASE + overrides)
  n = cfg.model.seq_len                                   # one sequence on one device: N = S
  key = _program_key(cfg, n)
  cache = {} if cache is None else cache
  reused = key in cache
  if not reused:
    cache[key] = bound_report.compile_program(cfg, num_devices=1)
  prog = dataclasses.replace(cache[key], cfg=cfg)
  rep = bound_report.report(prog, tol)
  by = {c: {'analytic': r['analytic'], 'compiled': r['compiled']} for c, r in rep['by_component'].items()}
  matmul = [c for c in by if c != 'elementwise']
  router_a = sum(by[c]['analytic'] for c in ROUTER)
  router_k = sum(by[c]['compiled'] for c in ROUTER)
  m = cfg.moe
  return {
      'axis': axis, 'value': value, 'series': series, 'dispatch': m.dispatch,
      'dispatch_resolved': rep['dispatch'], 'experts_per_layer': m.experts_total,
      'experts_total': m.experts_total * cfg.model.num_moe_layers, 'tiers': m.num_tiers,
      'groups_per_tier': m.groups_per_tier, 'experts_per_group': m.experts_per_group, 'k_active': m.k_active,
      'd_model': cfg.model.d_model, 'd_expert': m.d_expert, 'num_layers': cfg.model.num_layers,
      'scan_layers': cfg.model.scan_layers, 'tokens_per_group': prog.tokens_per_group,
      'flops_per_token_analytic': rep['flops_per_token_analytic'],
      'flops_per_token_analytic_unpadded': rep['flops_per_token_analytic_unpadded'],
      'flops_per_token_compiled': rep['flops_per_token_compiled'], 'ratio': rep['ratio'],
      'router_analytic': router_a, 'router_compiled': router_k,
      'router_analytic_formula': 'per MoE layer 2·d·(T + k_tier·G + k_tier·k_group·E_g) (levels with one branch: 0)',
      'outside_router_analytic': sum(by[c]['analytic'] for c in matmul if c not in ROUTER),
      'outside_router_compiled': sum(by[c]['compiled'] for c in matmul if c not in ROUTER),
      'by_component': by, 'artefacts_per_token': rep['artefacts_per_token'],
      'violations': rep['violations'], 'params_total': rep['params_total'],
      'compile_seconds': prog.compile_seconds, 'reused_compile': reused, 'overrides': overrides,
      'expected_bound': bounds.spec_formula(cfg)['formula'],
  }


def run_axis(axis: str, quick: bool = False, cache: dict | None = None, log=print,
             only: list[tuple[str, int, list[str]]] | None = None) -> list[dict]:
  """Rows of one axis (`only`: explicit (series, value, overrides) points instead of `points`)."""
  cache = {} if cache is None else cache
  rows = []
  for series, value, overrides in only or points(axis, quick):
    t0 = time.perf_counter()
    row = measure(series, axis, value, overrides, cache)
    rows.append(row)
    if log:
      log(f'{axis:8s} {series:12s} {value:>8d}  E/layer {row["experts_per_layer"]:>8d}  '
          f'compiled {row["flops_per_token_compiled"]:10.4g}  analytic {row["flops_per_token_analytic"]:10.4g}  '
          f'ratio {row["ratio"]:.4f}  router {row["router_compiled"]:9.4g}  outside {row["outside_router_compiled"]:9.4g}'
          f'  {row["dispatch_resolved"]:8s} {time.perf_counter() - t0:5.1f}s{" (reused)" if row["reused_compile"] else ""}')
  return rows


# ------------------------------------------------------------------------------------------ summary

def _series(rows, axis, series):
  return sorted((r for r in rows if r['axis'] == axis and r['series'] == series), key=lambda r: r['value'])


def _spread(xs) -> float:
  xs = list(xs)
  return max(xs) / min(xs) - 1 if xs and min(xs) > 0 else math.inf


def _rel_err(rows, key_k, key_a) -> float:
  return max((abs(r[key_k] / r[key_a] - 1) if r[key_a] else (0.0 if r[key_k] == 0 else math.inf))
             for r in rows) if rows else math.nan


def _comp(r, c, kind='compiled'):
  return r['by_component'][c][kind]


def summarize(rows: list[dict], tol: float = 0.03) -> dict:
  """Headline numbers per axis and the checks behind them ('checks': name -> bool; 'ok': all)."""
  out: dict = {'axes': {}, 'checks': {}}
  axes = sorted({r['axis'] for r in rows}, key=AXES.index)
  for axis in axes:
    s: dict = {}
    if axis == 'experts':
      g, a = _series(rows, axis, 'gather'), _series(rows, axis, 'auto')
      f, e, c = (_series(rows, axis, n) for n in ('flat_router', 'einsum', 'capacity'))
      if g:
        s['gather'] = {
            'experts_per_layer': [r['value'] for r in g],
            'outside_router_compiled': [r['outside_router_compiled'] for r in g],
            'outside_router_max_relative_spread': _spread(r['outside_router_compiled'] for r in g),
            'router_compiled': [r['router_compiled'] for r in g],
            'router_analytic': [r['router_analytic'] for r in g],
            'router_max_relative_error': _rel_err(g, 'router_compiled', 'router_analytic'),
            'max_ratio': max(r['ratio'] for r in g)}
        out['checks']['experts: gather outside router flat within 1%'] = \
            s['gather']['outside_router_max_relative_spread'] < 0.01
        out['checks']['experts: gather router == analytic within 1%'] = s['gather']['router_max_relative_error'] < 0.01
      if a:
        s['auto'] = {'experts_per_layer': [r['value'] for r in a],
                     'dispatch': [r['dispatch_resolved'] for r in a],
                     'ratio': [r['ratio'] for r in a], 'max_ratio': max(r['ratio'] for r in a),
                     'max_ratio_vs_unpadded': max(r['flops_per_token_compiled'] / r['flops_per_token_analytic_unpadded']
                                                  for r in a),
                     'violations': sum(len(r['violations']) for r in a)}
        out['checks']['experts: auto within bound'] = s['auto']['max_ratio'] <= 1 + tol and not s['auto']['violations']
      for name, ser, key in (('flat_router', f, 'router_compiled'), ('einsum', e, 'flops_per_token_compiled'),
                             ('capacity', c, 'flops_per_token_compiled')):
        if len(ser) >= 2:
          lo, hi = ser[0], ser[-1]
          s[name] = {'experts_per_layer': [r['value'] for r in ser], 'growth_of': key,
                     'growth': hi[key] / lo[key], 'experts_growth': hi['value'] / lo['value'],
                     'total_growth': hi['flops_per_token_compiled'] / lo['flops_per_token_compiled'],
                     'max_ratio': max(r['ratio'] for r in ser)}
      if 'flat_router' in s:
        fr = s['flat_router']
        fr['router_max_relative_error'] = _rel_err(f, 'router_compiled', 'router_analytic')
        out['checks']['experts: flat router grows ~ E'] = fr['growth'] > 0.5 * fr['experts_growth']
      if 'einsum' in s:
        out['checks']['experts: einsum grows with E'] = s['einsum']['total_growth'] > 2
    elif axis == 'd_model':
      g = _series(rows, axis, 'gather')
      s['attention_proj_factor_per_doubling'] = [_comp(b, 'attention_proj') / _comp(a, 'attention_proj')
                                                 for a, b in zip(g, g[1:])]
      s['experts_factor_per_doubling'] = [_comp(b, 'experts') / _comp(a, 'experts') for a, b in zip(g, g[1:])]
      s['max_ratio'] = max(r['ratio'] for r in g)
      out['checks']['d_model: attention_proj x4 per doubling'] = all(
          abs(x / 4 - 1) < 0.01 for x in s['attention_proj_factor_per_doubling'])
      out['checks']['d_model: experts x2 per doubling'] = all(
          abs(x / 2 - 1) < 0.01 for x in s['experts_factor_per_doubling'])
    elif axis in LINEAR_IN:     # expert FLOPs per unit of the swept size: flat
      per, size, symbol = LINEAR_IN[axis]
      g = _series(rows, axis, 'gather')
      s[per] = [_comp(r, 'experts') / r[size] for r in g]
      s[f'{per}_spread'] = _spread(s[per])
      s['max_ratio'] = max(r['ratio'] for r in g)
      out['checks'][f'{axis}: experts linear in {symbol}'] = s[f'{per}_spread'] < 0.01
    elif axis == 'layers':
      sc, un = _series(rows, axis, 'scanned'), _series(rows, axis, 'unrolled')
      per_layer = [(r['flops_per_token_compiled'] - _comp(r, 'unembed')) / r['value'] for r in sc]
      s['per_layer_compiled'] = per_layer
      s['per_layer_spread'] = _spread(per_layer)
      both = {r['value']: r for r in sc}
      s['scan_vs_unrolled_max_relative_difference'] = max(
          (abs(r['flops_per_token_compiled'] / both[r['value']]['flops_per_token_compiled'] - 1)
           for r in un if r['value'] in both), default=math.nan)
      s['max_ratio'] = max(r['ratio'] for r in sc + un)
      out['checks']['layers: linear in L'] = s['per_layer_spread'] < 0.01
      out['checks']['layers: scan == unrolled'] = s['scan_vs_unrolled_max_relative_difference'] < 1e-6
    elif axis == 'tiers':
      g = _series(rows, axis, 'gather')
      s['outside_router_max_relative_spread'] = _spread(r['outside_router_compiled'] for r in g)
      s['router_max_relative_error'] = _rel_err(g, 'router_compiled', 'router_analytic')
      s['router_tier_compiled'] = [_comp(r, 'router_tier') for r in g]
      s['max_ratio'] = max(r['ratio'] for r in g)
      out['checks']['tiers: outside router flat within 1%'] = s['outside_router_max_relative_spread'] < 0.01
      out['checks']['tiers: router == analytic within 1%'] = s['router_max_relative_error'] < 0.01
    bounded = [r for r in rows if r['axis'] == axis and r['series'] not in ('einsum', 'capacity', 'flat_router')]
    if bounded:
      out['checks'][f'{axis}: no bound violations'] = not any(r['violations'] for r in bounded)
    out['axes'][axis] = s
  out['ok'] = all(out['checks'].values())
  out['compiles'] = sum(not r['reused_compile'] for r in rows)
  out['compile_seconds'] = sum(r['compile_seconds'] for r in rows if not r['reused_compile'])
  return out


# ------------------------------------------------------------------------------------------ plots

def plot_axis(rows: list[dict], axis: str, path=None):
  """One figure per axis: compiled (markers) vs analytic (dashed) FLOPs per token; written to `path`
  (and closed) when given, else returned to draw inline (the notebook)."""
  rs = [r for r in rows if r['axis'] == axis]
  if axis == 'experts':
    fig, (ax1, ax2) = harness.figure(2, figsize=(12, 4.5), headless=path is not None)
    for series in ('einsum', 'capacity', 'flat_router', 'auto', 'gather'):
      sr = _series(rs, axis, series)
      if sr:
        line, = ax1.plot([r['value'] for r in sr], [r['flops_per_token_compiled'] for r in sr], 'o-',
                         label=f'{series} (compiled)', ms=4)
        ax1.plot([r['value'] for r in sr], [r['flops_per_token_analytic'] for r in sr], '--',
                 color=line.get_color(), alpha=0.5)
    harness.style(ax1, 'experts per layer', 'matmul FLOPs / token', xlog=10, ylog=True, legend=8,
                  title='total (dashed: analytic bound with padding)')
    g = _series(rs, axis, 'gather')
    if g:
      xs = [r['value'] for r in g]
      ax2.plot(xs, [r['outside_router_compiled'] for r in g], 'o-', label='outside router (compiled)')
      ax2.plot(xs, [r['router_compiled'] for r in g], 's-', label='router (compiled)')
      ax2.plot(xs, [r['router_analytic'] for r in g], 'k--', alpha=0.6,
               label='router analytic 2d(T+k_t G+k_t k_g E_g)')
      f = _series(rs, axis, 'flat_router')
      if f:
        ax2.plot([r['value'] for r in f], [r['router_compiled'] for r in f], '^-', label='flat router (compiled)')
      harness.style(ax2, 'experts per layer', 'FLOPs / token', xlog=10, ylog=True, legend=8,
                    title='gather path: hierarchical growth, K fixed')
  else:
    fig, ax = harness.figure(1, figsize=(6.5, 4.5), headless=path is not None)
    comps = sorted({c for r in rs for c, v in r['by_component'].items()
                    if c != 'elementwise' and (v['compiled'] or v['analytic'])})
    for series in sorted({r['series'] for r in rs}):
      sr = _series(rs, axis, series)
      xs = [r['value'] for r in sr]
      line, = ax.plot(xs, [r['flops_per_token_compiled'] for r in sr], 'o-', lw=2, label=f'total ({series})')
      ax.plot(xs, [r['flops_per_token_analytic'] for r in sr], '--', color=line.get_color(), alpha=0.5)
    base = _series(rs, axis, sorted({r['series'] for r in rs})[0])
    xs = [r['value'] for r in base]
    for c in comps:
      line, = ax.plot(xs, [_comp(r, c) for r in base], '.-', label=c, alpha=0.8)
      ax.plot(xs, [_comp(r, c, 'analytic') for r in base], ':', color=line.get_color(), alpha=0.5)
    harness.style(ax, axis, 'matmul FLOPs / token', xlog=10, ylog=True,
                  title=f'{axis}: compiled (solid) vs analytic (dashed/dotted)')
  if path is None:
    fig.tight_layout()
  else:
    harness.save(fig, path)
  return fig


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
  p = harness.parser(__doc__, quick='fewer points (< 2 minutes on 2 cores)')
  p.add_argument('--axis', choices=AXES + ('all',), default='experts')
  args = p.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  out = harness.out_dir(args.out)
  axes = AXES if args.axis == 'all' else (args.axis,)
  t0 = time.perf_counter()
  rows, cache = [], {}
  for axis in axes:
    rows += run_axis(axis, args.quick, cache)
    plot_axis(rows, axis, out / f'bound_sweep_{axis}.png')
  summary = summarize(rows)
  summary['seconds'] = time.perf_counter() - t0
  summary['command'] = 'python experiments/bound_sweep.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
  harness.write_json(out, 'bound_sweep.json', rows)
  harness.write_json(out, 'bound_sweep_summary.json', summary)
  for name, ok in summary['checks'].items():
    print(f'{"PASS" if ok else "FAIL"}  {name}')
  print(f'{len(rows)} points, {summary["compiles"]} compiles in {summary["seconds"]:.0f}s -> {out}')
  return 0 if summary['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
