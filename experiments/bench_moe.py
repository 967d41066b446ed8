"""One MoE layer, forward+backward under jit, side by side: litejax dispatch paths vs a dense floor,
the GShard einsum baseline, JAX's ragged_dot and a published all-experts MoE (nano-moe-jax).

    python experiments/bench_moe.py --out out/bench            # E in {8, 64, 256, 1024}
    python experiments/bench_moe.py --quick --out out/bench    # E in {8, 64}, fewer tokens

Writes OUT/bench_moe.json (a list of rows: impl, experts, median_seconds, ratio_to_dense,
flops_compiled, temp_bytes, ...) and OUT/bench_moe.png. All rows use the same tokens, K, d, h and
machine, in one process; each row is the median of 10 timed runs after a warm-up run, or of at least
3 when they take longer than --budget seconds together (recorded as timed_runs); ratios are to the
dense FFN with the same active parameters (hidden = K·h) at the same token count (the median of the
dense rows across E: it is the same program at every E).
An implementation that fails at some E gets a row with its error instead of a time.

Beside the implementations: `weight_grad_floor` (read every expert weight, write a fresh buffer of
the same size: the least memory traffic of any fwd+bwd that returns dense weight gradients) and, in
the `tokens` series, dense and auto again at --scale-tokens tokens per step.
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp

import harness
from litejax.config import from_dict
from litejax.model.moe.capacity import resolve_dispatch
from litejax.model.moe.dispatch import moe_ffn
from litejax.model.moe.rows import expert_ffn
from litejax.model.moe.routing import route


def compiled_stats(compiled) -> tuple[float, int]:
  ca = compiled.cost_analysis()
  mem = compiled.memory_analysis()
  return float(ca.get('flops', 0.0)), int(getattr(mem, 'temp_size_in_bytes', 0) or 0)


def init_weights(key, E, d, h, kind):
  """Expert weights w_in [E, d, h], w_out [E, h, d] (and w_gate for glu)."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  w = {'w_in': jax.random.normal(k1, (E, d, h)) * d ** -0.5, 'w_out': jax.random.normal(k2, (E, h, d)) * h ** -0.5}
  if kind == 'glu':
    w['w_gate'] = jax.random.normal(k3, (E, d, h)) * d ** -0.5
  return w


def moe_config(E, h, K, kind, capacity_factor, routing):
  """litejax's MoE config at E experts. `flat`: one softmax over all E (Mixtral-style). `hier`: groups of
  2^ceil(log2(E)/2) experts (E = 1024: 32 x 32), top-1 group then top-K experts in it, so the router
  scores ~2·sqrt(E) branches, not E (the spec's hierarchical routing). On CPU at these E the flat
  router's one dense matmul is faster than the hierarchy's per-token gather of its group's router
  weights, although it does more FLOPs; the hierarchy pays where E·N logits would not fit."""
  eg = E if routing == 'flat' else 2 ** math.ceil(math.log2(E) / 2)
  return from_dict({'moe': dict(num_tiers=1, groups_per_tier=E // eg, experts_per_group=eg, k_group=1,
                                k_expert=K, d_expert=h, capacity_factor=capacity_factor, expert_kind=kind,
                                dispatch='auto')}).moe


def router_params(key, cfg, d):
  k1, k2 = jax.random.split(key)
  G, Eg = cfg.groups_per_tier, cfg.experts_per_group
  params = {'expert': jax.random.normal(k1, (G, d, Eg)) * d ** -0.5}
  if G > 1:
    params['group'] = jax.random.normal(k2, (1, d, G)) * d ** -0.5
  return params


def weight_grad_floor_step(w):
  """Reads every expert weight and writes a fresh buffer of the same size: the memory traffic that
  any forward+backward returning dense weight gradients pays at least, whatever its FLOPs."""
  return jax.tree.map(lambda a: a * 2.0, w)


def loss_of(y):
  return jnp.mean(jnp.square(y))


def litejax_step(cfg, path):
  def step(x, w, router):
    def f(x, w, router):
      y, _ = moe_ffn(x, route(x, router, cfg), w, cfg, path)
      return loss_of(y)
    return jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, router)
  return step


def dense_step(kind):
  def step(x, w):
    def f(x, w):
      return loss_of(expert_ffn(x, w, kind, 'nd,dh->nh', 'nh,hd->nd'))
    return jax.value_and_grad(f, argnums=(0, 1))(x, w)
  return step


def ragged_step(cfg):
  """Dropless grouped matmul: sort assignments by expert, lax.ragged_dot per group, unsort, combine."""
  def step(x, w, router):
    def f(x, w, router):
      r = route(x, router, cfg)
      n, k = r.expert_nk.shape
      flat_e = r.expert_nk.reshape(-1)
      order = jnp.argsort(flat_e)
      x_sorted = jnp.repeat(x, k, axis=0)[order]
      sizes = jnp.bincount(flat_e, length=w['w_in'].shape[0]).astype(jnp.int32)
      h = jax.lax.ragged_dot(x_sorted, w['w_in'], sizes)
      if 'w_gate' in w:
        h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, w['w_gate'], sizes)) * h
      else:
        h = jax.nn.relu(h)
      y_sorted = jax.lax.ragged_dot(h, w['w_out'], sizes)
      y_nk = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(n, k, -1)
      return loss_of(jnp.einsum('nkd,nk->nd', y_nk, r.weight_nk))
    return jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, router)
  return step


def nano_moe_step(E, d, h, K):
  """nano-moe-jax's MoELayer as it ships (computes every expert, then keeps the top-k)."""
  from nano_moe import MoELayer, NanoMoEConfig   # optional: pip install 'litejax[bench]'
  layer = MoELayer(NanoMoEConfig(d_model=d, d_ff=h, n_experts=E, top_k=K, dropout_rate=0.0))

  def init(key, x):
    return layer.init(key, x[None])

  def step(x, params):
    def f(x, params):
      y, aux = layer.apply(params, x[None], deterministic=True)
      return loss_of(y)
    return jax.value_and_grad(f, argnums=(0, 1))(x, params)
  return init, step


def run(args) -> list[dict]:
  experts = [8, 64] if args.quick else [8, 64, 256, 1024]
  tokens = args.tokens or (256 if args.quick else 1024)
  d, h, K, kind = args.d_model, args.d_expert, args.k, args.kind
  repeats = args.repeats
  rows = []

  def record(impl, E, fn, fargs, extra=None, n=tokens):
    row = {'impl': impl, 'experts': E, 'tokens': n, 'd_model': d, 'd_expert': h, 'k': K, 'kind': kind,
           'series': 'main' if n == tokens else 'tokens', 'tokens_per_expert': n * K / E}
    row.update(extra or {})
    try:
      # --repeats runs, or fewer (at least 3) once they take --budget seconds (the all-experts rows at
      # E = 1024 take seconds each on 2 cores)
      times, compiled = harness.time_compiled(fn, fargs, repeats, budget_s=args.budget)
      flops, temp = compiled_stats(compiled)
      row.update(median_seconds=statistics.median(times), timed_runs=len(times), flops_compiled=flops,
                 temp_bytes=temp, error=None)
    except Exception as e:  # a failing or OOM implementation gets a row saying so
      row.update(median_seconds=None, flops_compiled=None, temp_bytes=None,
                 error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
      if args.verbose:
        traceback.print_exc()
    rows.append(row)
    print(f"  {impl:18s} E={E:5d} N={n:6d} " + (f"{row['median_seconds'] * 1e3:9.2f} ms" if row['error'] is None
                                                 else f"FAILED {row['error']}"), flush=True)

  def record_missing(impl, E, error):   # a row that says why there is no time
    rows.append({'impl': impl, 'experts': E, 'tokens': tokens, 'series': 'main', 'median_seconds': None,
                 'ratio_to_dense': None, 'flops_compiled': None, 'temp_bytes': None, 'error': error})

  def dense_weights(key):
    k1, k2, k3 = jax.random.split(key, 3)
    w = {'w_in': jax.random.normal(k1, (d, K * h)) * d ** -0.5,
         'w_out': jax.random.normal(k2, (K * h, d)) * (K * h) ** -0.5}
    if kind == 'glu':
      w['w_gate'] = jax.random.normal(k3, (d, K * h)) * d ** -0.5
    return w

  x = jax.random.normal(jax.random.key(0), (tokens, d))
  dense_w = dense_weights(jax.random.key(1))
  for E in experts:
    print(f'E = {E}', flush=True)
    record('dense', E, dense_step(kind), (x, dense_w))
    cfg = moe_config(E, h, K, kind, args.capacity_factor, args.routing)
    w = init_weights(jax.random.key(E), E, d, h, kind)
    router = router_params(jax.random.key(E + 1), cfg, d)
    meta = {'routing': args.routing, 'groups': cfg.groups_per_tier, 'weight_bytes': 4 * sum(v.size for v in w.values())}
    record('weight_grad_floor', E, weight_grad_floor_step, (w,), meta)
    for path in ('auto', 'capacity', 'gather', 'einsum'):
      ran = resolve_dispatch(cfg, tokens) if path == 'auto' else path
      record(f'litejax_{path}', E, litejax_step(cfg, None if path == 'auto' else path), (x, w, router),
             {**meta, 'dispatch': ran})
    other = 'hier' if args.routing == 'flat' else 'flat'
    if E >= 64:   # the other router beside it (hierarchy from 8 x 8 up; 2 groups of 4 would be no design)
      alt = moe_config(E, h, K, kind, args.capacity_factor, other)
      record(f'litejax_auto_{other}_router', E, litejax_step(alt, None),
             (x, w, router_params(jax.random.key(E + 1), alt, d)),
             {**meta, 'routing': other, 'groups': alt.groups_per_tier, 'dispatch': resolve_dispatch(alt, tokens)})
    record('ragged_dot', E, ragged_step(cfg), (x, w, router), meta)
    if E > args.peer_max_experts:
      record_missing('nano_moe_jax', E, f'skipped: its init (one Dense module per expert) had not compiled '
                                        f'after 10 min at E=1024 on 2 cores (--peer-max-experts {args.peer_max_experts})')
    else:
      try:
        init, step = nano_moe_step(E, d, h, K)
        params = jax.jit(init)(jax.random.key(1), x)
        record('nano_moe_jax', E, step, (x, params))
      except ImportError as e:
        record_missing('nano_moe_jax', E, f'not installed: {e}')
    # More tokens per step at the same E: the per-step weight traffic (E·d·h per matrix, read and
    # written as gradients) is spread over more tokens, so the ratio to dense falls toward the FLOP ratio.
    for n in args.scale_tokens:
      xn = jax.random.normal(jax.random.key(n), (n, d))
      record('dense', E, dense_step(kind), (xn, dense_w), n=n)
      record('litejax_auto', E, litejax_step(cfg, None), (xn, w, router),
             {**meta, 'dispatch': resolve_dispatch(cfg, n)}, n=n)
  add_ratios(rows)
  return rows


def add_ratios(rows: list[dict]) -> None:
  """ratio_to_dense = time / the dense floor at the same token count. The dense step is the same
  program at every E, so its floor is the median of its rows across E (one noisy dense run would
  otherwise skew that E's whole column); each row keeps its own dense time as dense_seconds_same_e."""
  by_tokens: dict[int, list[float]] = {}
  same_e = {}
  for r in rows:
    if r['impl'] == 'dense' and r.get('median_seconds'):
      by_tokens.setdefault(r.get('tokens'), []).append(r['median_seconds'])
      same_e[(r['experts'], r.get('tokens'))] = r['median_seconds']
  for r in rows:
    base = statistics.median(by_tokens[r.get('tokens')]) if r.get('tokens') in by_tokens else None
    r['dense_seconds'] = base
    r['dense_seconds_same_e'] = same_e.get((r['experts'], r.get('tokens')))
    r['ratio_to_dense'] = (r['median_seconds'] / base) if (r.get('median_seconds') and base) else None


def summarize(rows: list[dict]) -> dict:
  """The issue's targets, computed from the main rows (not asserted: recorded, hit or miss), plus
  what bounds them: the weight-gradient memory floor and the same ratios at more tokens per step."""
  def by(impl, series='main'):
    return {r['experts']: r for r in rows
            if r['impl'] == impl and r.get('series', 'main') == series and r.get('median_seconds')}
  auto, peer, floor = by('litejax_auto'), by('nano_moe_jax'), by('weight_grad_floor')
  ratios = [r['ratio_to_dense'] for r in auto.values()]
  times = [r['median_seconds'] for r in auto.values()]
  out = {'tokens': next(iter(auto.values()))['tokens'] if auto else None,
         'auto_ratio_to_dense': {E: r['ratio_to_dense'] for E, r in auto.items()},
         'auto_max_ratio_to_dense': max(ratios) if ratios else None,
         'auto_within_1_5x_dense': bool(ratios) and max(ratios) <= 1.5,
         'auto_flatness_max_over_min': (max(times) / min(times)) if times else None,
         'auto_speedup_vs_nano_moe': {E: peer[E]['median_seconds'] / auto[E]['median_seconds']
                                      for E in auto if E in peer},
         'weight_grad_floor_ratio_to_dense': {E: r['ratio_to_dense'] for E, r in floor.items()}}
  scaled = by('litejax_auto', 'tokens')
  if scaled:
    s_times = [r['median_seconds'] for r in scaled.values()]
    out['more_tokens'] = {'tokens': next(iter(scaled.values()))['tokens'],
                          'auto_ratio_to_dense': {E: r['ratio_to_dense'] for E, r in scaled.items()},
                          'auto_flatness_max_over_min': max(s_times) / min(s_times)}
  return out


def plot(rows, path):
  fig, ax = harness.figure(figsize=(7, 4.5))
  for impl in dict.fromkeys(r['impl'] for r in rows):
    pts = sorted((r['experts'], r['ratio_to_dense']) for r in rows
                 if r['impl'] == impl and r.get('series', 'main') == 'main' and r.get('ratio_to_dense'))
    if pts:
      ax.plot(*zip(*pts), marker='o', label=impl)
  ax.axhline(1.5, color='grey', ls=':', lw=1)
  harness.style(ax, 'experts E (K fixed)', 'time / dense FFN with equal active params', xlog=2, ylog=True,
                title='MoE layer fwd+bwd, one machine, one run', legend=8)
  harness.save(fig, path)


def main(argv=None) -> int:
  p = harness.parser(__doc__, quick='E in {8, 64}, 256 tokens, no --scale-tokens rows', repeats=10)
  p.add_argument('--tokens', type=int, default=0)
  harness.add_layer_shape(p)
  p.add_argument('--kind', default='mlp', choices=['mlp', 'glu'])
  p.add_argument('--capacity-factor', type=float, default=1.25)
  p.add_argument('--routing', default='flat', choices=['flat', 'hier'],
                 help="litejax's router for the main rows: flat over E (default) or hierarchical groups of "
                      "~sqrt(E); from E = 64 the other one gets a row too")
  p.add_argument('--scale-tokens', type=int, nargs='*', default=None,
                 help='extra token counts for dense and auto rows at every E (default: 8192; --quick: none)')
  p.add_argument('--budget', type=float, default=15.0, help='seconds of timed runs per row before stopping early (>= 3 runs)')
  p.add_argument('--device', default=None, help='jax platform to run on (cpu, gpu, tpu); default: JAX picks')
  p.add_argument('--peer-max-experts', type=int, default=256,
                 help='largest E for nano-moe-jax (its per-expert modules compile for many minutes beyond)')
  p.add_argument('--from-json', default=None, help='recompute ratios, summary and plot from this bench_moe.json')
  p.add_argument('--verbose', action='store_true')
  args = p.parse_args(argv)
  if args.scale_tokens is None:
    args.scale_tokens = [] if args.quick else [8192]
  if args.device:
    jax.config.update('jax_platforms', args.device)
  out = harness.out_dir(args.out)
  if args.from_json:   # re-derive ratios, summary and plot from an earlier run's rows
    rows = json.loads(pathlib.Path(args.from_json).read_text())
    add_ratios(rows)
  else:
    rows = run(args)
    machine = harness.machine()
    for r in rows:
      r['machine'] = machine
  summary = summarize(rows)
  harness.write_json(out, 'bench_moe.json', rows)
  harness.write_json(out, 'bench_moe_summary.json', summary)
  plot(rows, out / 'bench_moe.png')
  print(json.dumps(summary, indent=1))
  print(f'wrote {out / "bench_moe.json"} and {out / "bench_moe.png"}')
  return 0

if __name__ == '__main__':
  sys.exit(main())
