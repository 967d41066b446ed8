"""The tiered expert store at decode (issue 13): hit rate and tokens/s against the device-resident fraction,
per eviction policy, with and without router lookahead, on a trained config with 1,024 experts per layer;
the --miss fallback quality cost; per-token latency of the disk-backed 1.2e9-parameter configs/store_1b.yaml
against the same model fully resident in host memory.

    python experiments/bench_tiers.py --out experiments/results           # trains configs/tiny_1k.yaml if
                                                                          # --ckpt-dir has no checkpoint
    python experiments/bench_tiers.py --quick --out /tmp/bt               # shrunk, untimed (the tests)

Where each figure comes from:
  * `sim`: device/host hit rates replayed by litejax.inference.store.simulate on the routing trace of real decoded
    text (batch 1, sampled at temperature 1 from the trained model, decode steps only: the prompt's
    prefill is not part of the trace). Lookahead does not move experts into device slots (it prefetches
    disk -> host), so the device hit rate is the same with and without it.
  * `decode`: real tiered decoding (litejax.inference.store_decode, miss=stall) of the same prompt: tokens/s
    (median step), the store report (per-tier hit rates over all lookups, prefill included; lookahead
    recall per depth; stall ms per token).
  * `fallback`: miss=fallback against miss=stall at 1% device slots with lookahead 1, same seed: token
    agreement, the first step where the tokens differ, mean |delta logit| over the steps before it.
  * `store_1b`: per-token latency with 1% device slots + 10% host cache + lookahead 1 from the disk store,
    against every expert preloaded into device slots (host memory on CPU): the same programs, no I/O.
  * pre-gated routing (issue 22; every row has `pregate`): `decode` rows of tiny_1k trained with
    moe.pregate=1 (exact prefetch, lookahead 0) beside the others, with `decode_hit_rate` (decode steps'
    lookups only); store_1b exported with moe.pregate=1 (`store_1b.pregated`, against its own resident
    step, in the same interleaved rounds; `store_1b.profile`: its step program by program); `quality`: the
    val loss of tiny_1k trained 300 steps with moe.pregate 0, 1, 2 (same seed and data); `pregate_targets`.
Writes OUT/bench_tiers.json, OUT/bench_tiers.png and OUT/bench_tiers_trace.json (the trace, for
experiments/notebooks/tiers.ipynb).
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
import tempfile

import numpy as np

import harness
from litejax.commands.generate import DEFAULT_LOOKAHEAD_WIDTH

FRACTIONS = (0.005, 0.01, 0.05, 0.1, 1.0)
POLICIES = ('lru', 'lfu', 'group')
QUICK_1B_SETS = ['moe.num_tiers=2', 'moe.groups_per_tier=4', 'moe.experts_per_group=16']


def sim_grid(trace, store, fractions, host_fraction: float) -> list[dict]:
  from litejax.inference.store.simulate import Step, simulate
  from litejax.inference.store.levels import LevelOptions
  steps = [Step(l, e) for l, e in trace]
  tokens = len(trace) // max(len(store.layers), 1)
  rows = []
  for policy in POLICIES:
    for f in fractions:
      opts = LevelOptions(f, host_fraction, policy, 0, 'stall')
      r = simulate(steps, layers=store.layers, experts_per_layer=store.num_experts,
                   expert_bytes=store.expert_bytes, device_slots=opts.num_slots(store.num_experts),
                   host_bytes=opts.host_experts(store.num_experts, len(store.layers)) * store.expert_bytes,
                   policy=policy, host_policy=policy if policy != 'group' else 'lru',
                   experts_per_group=store.experts_per_group, tokens=tokens)
      rows.append({'policy': policy, 'device_fraction': f, 'slots': opts.num_slots(store.num_experts),
                   'device_hit_rate': r.device.hit_rate, 'host_hit_rate_of_device_misses': r.host.hit_rate,
                   'hit_rate_device_or_host': (r.device.hits + r.host.hits) / max(r.device.hits + r.device.misses, 1)})
  return rows


def decode_grid(models, fractions, prompt, new_tokens, host_fraction, width: int, policies=POLICIES) -> list[dict]:
  """Real store decodes per policy and slot fraction of each model in `models` ({pregate: (cfg, model, store)}):
  the unpregated one without and with lookahead, a pre-gated one with its exact prefetch (lookahead 0),
  side by side."""
  from litejax.inference.sampling import Sampling
  from litejax.inference.store.levels import LevelOptions
  rows = []
  for policy in policies:
    for f in fractions:
      for pregate, lookahead in [(d, la) for d in models for la in ((0, 1) if d == 0 else (0,))]:
        cfg, model, store = models[pregate]
        opts = LevelOptions(f, host_fraction, policy, lookahead, 'stall', width)
        gen, _, rep, _ = harness.tiered_decode(cfg, model, store, opts, prompt, new_tokens,
                                               Sampling(temperature=1.0))
        steps = gen.step_s[1:] or gen.step_s      # the first decode step compiles
        rows.append({'pregate': pregate, 'policy': policy, 'lookahead': lookahead, 'device_fraction': f,
                     'tokens_per_second': 1 / statistics.median(steps), 'ms_per_token_p50':
                     1e3 * statistics.median(steps), 'hit_rate': rep['hit_rate'],
                     'decode_hit_rate': rep['decode_hit_rate'],
                     'decode_device_hit_rate_per_layer': rep['decode_device_hit_rate_per_layer'],
                     'lookahead_recall': rep['lookahead_recall'], 'stall_ms_per_token': rep['stall_ms_per_token'],
                     'io_wait_ms_per_token': rep['io_wait_ms_per_token'],
                     'slots_per_layer': rep['slots_per_layer'], 'lookahead_width': width if lookahead else None,
                     'staged_hits': rep['staged_hits'], 'lookups': rep['lookups'],
                     'prefetch_wasted_bytes_per_token': rep['prefetch_wasted_bytes_per_token'],
                     'bytes_read_per_token': rep['bytes_read_per_token']})
        print(f"decode pregate={pregate} {policy} la={lookahead} f={f}: {rows[-1]['tokens_per_second']:.1f} tok/s "
              f"device hit {rep['hit_rate']['device']:.3f} (decode steps {rep['decode_hit_rate']['device']:.3f}) "
              f"recall {rep['lookahead_recall']}", flush=True)
  return rows


def fallback_cost(cfg, model, store, prompt, new_tokens, host_fraction) -> dict:
  from litejax.inference.sampling import Sampling
  from litejax.inference.store.levels import LevelOptions
  out = {}
  for miss in ('stall', 'fallback'):
    opts = LevelOptions(0.01, host_fraction, 'lru', 1, miss)
    gen, logits, rep, _ = harness.tiered_decode(cfg, model, store, opts, prompt, new_tokens, Sampling(),
                                                keep_logits=True)
    out[miss] = (gen.tokens[0], logits, rep)
  (ts, ls, _), (tf, lf, rep) = out['stall'], out['fallback']
  agree = [a == b for a, b in zip(ts, tf)]
  first = agree.index(False) if False in agree else len(agree)
  # logits kept[i] predict token i; they see the same context until the first differing token
  delta = [float(np.abs(a - b).mean()) for a, b in zip(ls[:first + 1], lf[:first + 1])]
  return {'device_fraction': 0.01, 'lookahead': 1, 'policy': 'lru', 'sampling': 'greedy',
          'token_agreement': float(np.mean(agree)), 'first_differing_token': first if first < len(agree) else None,
          'mean_abs_delta_logit_same_context': float(np.mean(delta)), 'steps_compared': len(delta),
          'fallback_rate': rep['hit_rate']['fallback']}


def store_1b(location: pathlib.Path, pregated_location: pathlib.Path, quick: bool, new_tokens: int, rounds: int,
             width: int) -> dict:
  """Per-token latency of the disk-backed store_1b (1% slots, 10% host; lookahead 1 at `width` with and
  without staging, at width 1, and no lookahead; and store_1b exported with moe.pregate=1 at
  `pregated_location`, fetching exactly) vs fully resident (the same experts preloaded into slots, the same
  model: pre-gated or not), measured in `rounds` interleaved rounds (each tiered run with fresh tiers);
  ratios are paired within a round, then the median over rounds. `profile`: the pre-gated step, program by
  program, beside its resident one's."""
  from litejax.model.bounds import param_counts
  from litejax.config import load_config
  from litejax.inference.sampling import Sampling
  from litejax.inference.step_latency import Recorder
  from litejax.inference.store.levels import LevelOptions, ExpertLevels
  from litejax.inference.store_decode import StoreRuntime
  sets = QUICK_1B_SETS if quick else []
  config = harness.REPO / 'configs' / 'store_1b.yaml'
  cfg, model, store = harness.init_store_model(load_config(config, sets), location)
  gated = harness.init_store_model(load_config(config, sets + ['moe.pregate=1']), pregated_location)
  prompt = harness.prompt_tokens()
  plain = {'tiered': LevelOptions(0.01, 0.1, 'lru', 1, 'stall', width),
           'tiered_no_stage': LevelOptions(0.01, 0.1, 'lru', 1, 'stall', width, stage=False),
           'tiered_no_lookahead': LevelOptions(0.01, 0.1, 'lru', 0, 'stall')}
  if width != 1:      # the router's own picks only, for comparison
    plain['tiered_width_1'] = LevelOptions(0.01, 0.1, 'lru', 1, 'stall', 1)
  variants = {name: ((cfg, model, store), opts) for name, opts in plain.items()}
  variants['pregated'] = (gated, LevelOptions(0.01, 0.1, 'lru', 0, 'stall'))
  # One set of preloaded slots serves both resident runtimes: the pre-gated store's experts are the same
  # (same config but moe.pregate, same seed); tokens_identical checks it.
  resident = ExpertLevels(store, LevelOptions(1.0, 1.0, 'lru', 0, 'stall'), load_width=cfg.moe.k_active)
  harness.preload_all(resident)
  shared = harness.store_programs()
  residents = {'resident': StoreRuntime(cfg, model, resident, programs=shared),
               'resident_pregated': StoreRuntime(*gated[:2], resident, programs=shared)}
  base = {name: 'resident_pregated' if name == 'pregated' else 'resident' for name in variants}
  ms: dict[str, list[float]] = {name: [] for name in [*residents, *variants]}
  rows, tokens = {}, {}
  for r in range(rounds):
    for name, rt in residents.items():
      gen, _ = rt.generate([prompt], new_tokens, Sampling())
      ms[name].append(1e3 * statistics.median(gen.step_s[1:] or gen.step_s))
      tokens[name] = gen.tokens[0]
    for name, (model_of, opts) in variants.items():
      gen, _, rep, _ = harness.tiered_decode(*model_of, opts, prompt, new_tokens, Sampling())
      ms[name].append(1e3 * statistics.median(gen.step_s[1:] or gen.step_s))
      tokens[name] = gen.tokens[0]
      rows[name] = {'pregate': model_of[0].moe.pregate, 'hit_rate': rep['hit_rate'],
                    'decode_hit_rate': rep['decode_hit_rate'], 'lookahead_recall': rep['lookahead_recall'],
                    'decode_device_hit_rate_per_layer': rep['decode_device_hit_rate_per_layer'],
                    'stall_ms_per_token': rep['stall_ms_per_token'], 'io_wait_ms_per_token': rep['io_wait_ms_per_token'],
                    'bytes_read_per_token': rep['bytes_read_per_token'], 'prefetch_wasted_bytes_per_token':
                    rep['prefetch_wasted_bytes_per_token'], 'staged': rep['staged'], 'staged_hits': rep['staged_hits'],
                    'lookahead_width': opts.lookahead_width if opts.lookahead else None}
    print(f'store_1b round {r}: ' + ', '.join(f'{k} {v[-1]:.1f} ms' for k, v in ms.items()), flush=True)
  profile = {}
  for name, run in (('resident_pregated', lambda hooks: residents['resident_pregated'].generate(
                        [prompt], new_tokens, Sampling(), hooks=hooks)),
                    ('pregated', lambda hooks: harness.tiered_decode(*gated, variants['pregated'][1], prompt, new_tokens,
                                                                     Sampling(), hooks=hooks))):
    rec = Recorder()
    run(rec)
    profile[name] = step_profile(rec, max(new_tokens - 2, 1))
  resident.close()
  rep = resident.report(rounds * new_tokens)
  rows['resident'] = {'pregate': 0, 'hit_rate': rep['hit_rate'], 'bytes_read_per_token': rep['bytes_read_per_token']}
  rows['resident_pregated'] = {'pregate': 1}
  for name in rows:
    rows[name].update({'ms_per_token_p50': statistics.median(ms[name]), 'ms_per_token_rounds': ms[name]})
    if name in base:
      rows[name]['latency_ratio'] = statistics.median(a / b for a, b in zip(ms[name], ms[base[name]]))
  rows['pregated']['latency_ratio_to_unpregated_resident'] = statistics.median(
      a / b for a, b in zip(ms['pregated'], ms['resident']))
  return {'params': int(param_counts(cfg).total), 'rounds': rounds,
          'experts_per_layer': store.num_experts, 'expert_bytes': store.expert_bytes, 'store': str(location),
          'store_pregated': str(pregated_location), **rows, 'latency_ratio': rows['tiered']['latency_ratio'],
          'profile': profile,
          'tokens_identical': all(t == tokens[base.get(name, name)] for name, t in tokens.items())}


def step_profile(rec, steps: int) -> dict:
  """One decode step of a store runtime from a Recorder's calls and waits (the medians over the last `steps`
  steps, ms): wall time, per program the time inside its calls (XLA:CPU runs small programs inline, so it
  holds execution as well as dispatch) and the calls per step, the waits for device results, and the rest
  (host work between calls: the level lookups and reads)."""
  calls = rec.calls
  firsts = [i for i, c in enumerate(calls) if c.name == '_embed'][-steps - 1:]
  per_step = []
  for a, b in zip(firsts, firsts[1:]):
    start, end = calls[a].t_start, calls[b].t_start
    row = {'wall_ms': 1e3 * (end - start), 'waits_ms': 1e3 * sum(d for t, d in rec.waits if start <= t < end)}
    for c in calls[a:b]:
      row[f'{c.name}_ms'] = row.get(f'{c.name}_ms', 0.0) + 1e3 * (c.t_end - c.t_start)
      row[f'{c.name}_calls'] = row.get(f'{c.name}_calls', 0) + 1
    row['rest_ms'] = row['wall_ms'] - row['waits_ms'] - sum(v for k, v in row.items()
                                                           if k.endswith('_ms') and k not in ('wall_ms', 'waits_ms'))
    per_step.append(row)
  return {k: statistics.median(r.get(k, 0.0) for r in per_step) for k in per_step[0]} if per_step else {}


def targets(sim_rows, dec_rows, big) -> dict:
  recall = [r['lookahead_recall'][0] for r in dec_rows if r['lookahead'] == 1 and r['lookahead_recall'][0]
            is not None and r['device_fraction'] < 1]
  hit5 = max(r['device_hit_rate'] for r in sim_rows if r['device_fraction'] == 0.05)
  return {'lookahead_recall_1_ahead': {'value': min(recall) if recall else None, 'target': 0.9,
                                       'reached': bool(recall) and min(recall) >= 0.9},
          'device_hit_rate_at_5pct_best_policy': {'value': hit5, 'target': 0.8, 'reached': hit5 >= 0.8},
          'store_1b_latency_ratio_1pct_lookahead': {'value': big['latency_ratio'], 'target': 2.0,
                                                    'reached': big['latency_ratio'] <= 2.0}}


def pregate_targets(dec_rows, big, quality) -> dict:
  """Issue 22's targets for pre-gated routing (moe.pregate = 1), each {'value', 'target', 'reached'}."""
  rows = [r for r in dec_rows if r['pregate']] + [big['pregated']]
  recall = [x for r in rows for x in r['lookahead_recall'] if x is not None]
  wasted = max(r['prefetch_wasted_bytes_per_token'] for r in rows)
  hit5 = [r['decode_hit_rate']['device'] for r in dec_rows if r['pregate'] and r['device_fraction'] == 0.05]
  ratio = big['pregated']['latency_ratio']
  loss = {q['pregate']: q.get('val_loss') for q in quality}
  rel = loss[1] / loss[0] if loss.get(0) and loss.get(1) else None
  return {'store_1b_pregate1_latency_ratio_1pct': {'value': ratio, 'target': 1.3, 'reached': ratio <= 1.3},
          'lookahead_recall_every_depth_pregated': {'value': min(recall) if recall else None, 'target': 1.0,
                                                    'reached': bool(recall) and min(recall) == 1.0},
          'prefetch_wasted_bytes_per_token_pregated': {'value': wasted, 'target': 0, 'reached': wasted == 0},
          'decode_device_hit_rate_at_5pct_pregated_best_policy': {
              'value': max(hit5) if hit5 else None, 'target': 0.9, 'reached': bool(hit5) and max(hit5) >= 0.9},
          'val_loss_pregate1_over_pregate0': {'value': rel, 'target': 1.02, 'reached': rel is not None and rel <= 1.02}}


def plot(sim_rows, dec_rows, path: pathlib.Path) -> None:
  fig, (a, b) = harness.figure(2, figsize=(10, 4))
  for policy in POLICIES:
    rs = [r for r in sim_rows if r['policy'] == policy]
    a.plot([100 * r['device_fraction'] for r in rs], [r['device_hit_rate'] for r in rs], 'o-', label=policy)
    for pregate, la, style in ((0, 0, 'o-'), (0, 1, 's--'), (1, 0, '^:')):
      rs = [r for r in dec_rows if r['policy'] == policy and r['lookahead'] == la and r['pregate'] == pregate]
      b.plot([100 * r['device_fraction'] for r in rs], [r['tokens_per_second'] for r in rs], style,
             label=f'{policy} pregate 1' if pregate else f'{policy} lookahead {la}')
  xlabel = 'experts in device slots (% per layer)'
  harness.style(a, xlabel, 'hit rate', title='device hit rate (trace replay)', xlog=10)
  harness.style(b, xlabel, 'tokens/s', title='tiered decode, batch 1', xlog=10)
  harness.save(fig, path)


def main(argv=None) -> int:
  p = harness.parser(__doc__, quick='shrunk configs, few tokens (untimed; the tests)')
  p.add_argument('--ckpt-dir', help='trained tiny_1k checkpoint (default: runs/tiny_1k/ckpt, trained if missing)')
  p.add_argument('--store-1b', help='store of configs/store_1b.yaml (written if missing; default: runs/store_1b)')
  p.add_argument('--store-1b-pregated', help='store of configs/store_1b.yaml with moe.pregate=1 (written if missing; '
                                             'default: runs/store_1b_pregate1)')
  p.add_argument('--pregated', help='folder of tiny_1k trained with moe.pregate=D, D/tiny_1k_pregate{1,2}/ckpt '
                                    '(trained if missing; default: runs/; --quick: pregate 1 from random weights)')
  p.add_argument('--trace-tokens', type=int, default=None, help='decoded tokens in the routing trace')
  p.add_argument('--decode-tokens', type=int, default=None, help='tokens per timed decode')
  p.add_argument('--lookahead-width', type=int, default=DEFAULT_LOOKAHEAD_WIDTH,
                 help=f'W of the lookahead rows (default {DEFAULT_LOOKAHEAD_WIDTH}, as generate --store)')
  p.add_argument('--rounds', type=int, default=3, help='interleaved rounds of the store_1b latency rows')
  p.add_argument('--skip-grid', action='store_true', help='store_1b rows only (no tiny_1k decode grid)')
  args = p.parse_args(argv)
  out = harness.out_dir(args.out)
  # checkpoints and stores never go under OUT (results only): a temporary folder for --quick, else runs/
  work = pathlib.Path(tempfile.mkdtemp(prefix='bench_tiers_')) if args.quick else harness.REPO / 'runs'
  trace_n = args.trace_tokens or (16 if args.quick else 512)
  dec_n = args.decode_tokens or (3 if args.quick else 32)
  fractions = (0.01,) if args.quick else FRACTIONS
  big_stores = (pathlib.Path(args.store_1b) if args.store_1b else work / 'store_1b',
                pathlib.Path(args.store_1b_pregated) if args.store_1b_pregated else work / 'store_1b_pregate1')
  if args.skip_grid:
    big = store_1b(*big_stores, args.quick, dec_n, 1 if args.quick else args.rounds, args.lookahead_width)
    harness.write_json(out, 'bench_tiers_store_1b.json', big)
    print(json.dumps({k: v for k, v in big.items() if 'ratio' in k or k == 'tokens_identical'}, default=float))
    return 0
  ckpt = pathlib.Path(args.ckpt_dir) if args.ckpt_dir else work / 'tiny_1k' / 'ckpt'
  how = harness.ensure_checkpoint(ckpt, args.quick)
  cfg, model, store = harness.load_store_model(ckpt, ckpt.parent / 'store')
  models, quality = pregated_models(args, work)
  models[0] = (cfg, model, store)
  quality.insert(0, {'pregate': 0, 'checkpoint': str(ckpt), **(harness.val_loss(ckpt) or {})})
  from litejax.inference.sampling import Sampling
  from litejax.inference.store.levels import LevelOptions
  prompt = harness.prompt_tokens()
  trace: list = []
  harness.tiered_decode(cfg, model, store, LevelOptions(1.0, 0.1, 'lru', 0, 'stall'), prompt, trace_n,
                        Sampling(temperature=1.0), record=trace)
  sim_rows = sim_grid(trace, store, FRACTIONS, 0.1)
  sim_rows = [{'pregate': 0, **r} for r in sim_rows]
  dec_rows = decode_grid(dict(sorted(models.items())), fractions, prompt, dec_n, 0.1, args.lookahead_width,
                         ('lru',) if args.quick else POLICIES)
  fb = fallback_cost(cfg, model, store, prompt, dec_n, 0.1)
  big = store_1b(*big_stores, args.quick, dec_n, 1 if args.quick else args.rounds, args.lookahead_width)
  quick_sets = ' (quick: ' + ', '.join(harness.QUICK_SETS) + ')' if args.quick else ''
  result = {'config': 'configs/tiny_1k.yaml' + quick_sets,
            'checkpoint': how, 'experts_per_layer': store.num_experts, 'layers': list(store.layers),
            'host_cache_fraction': 0.1, 'trace_tokens': trace_n, 'decode_tokens': dec_n, 'quick': args.quick,
            'sim': sim_rows, 'decode': dec_rows, 'fallback': fb, 'store_1b': big, 'quality': quality,
            'targets': targets(sim_rows, dec_rows, big), 'pregate_targets': pregate_targets(dec_rows, big, quality)}
  harness.write_json(out, 'bench_tiers.json', result)
  harness.write_json(out, 'bench_tiers_trace.json',
                     {'experts_per_layer': store.num_experts, 'experts_per_group': store.experts_per_group,
                      'layers': list(store.layers), 'expert_bytes': store.expert_bytes, 'trace': trace}, indent=None)
  plot(sim_rows, dec_rows, out / 'bench_tiers.png')
  print(json.dumps({**result['targets'], **result['pregate_targets']}, indent=1, default=float))
  return 0


def pregated_models(args, work: pathlib.Path):
  """({1: (cfg, model, store)} of tiny_1k trained with moe.pregate=1, the val loss of each pre-gated run
  [{'pregate', 'checkpoint', 'step', 'val_loss'}]): runs D/tiny_1k_pregate{1,2}/ckpt (trained if missing,
  their experts exported once). --quick (2 layers: pregate 1 only): random weights, an --init store, no
  val loss."""
  if args.quick:
    from litejax.config import load_config
    cfg = load_config(harness.REPO / 'configs' / 'tiny_1k.yaml', harness.QUICK_SETS + ['moe.pregate=1'])
    return ({1: harness.init_store_model(cfg, work / 'tiny_1k_pregate1_init')},
            [{'pregate': 1, 'checkpoint': None, 'val_loss': None, 'note': 'quick: random weights, not trained'}])
  root = pathlib.Path(args.pregated) if args.pregated else harness.REPO / 'runs'
  quality, models = [], {}
  for depth in (1, 2):
    ckpt = root / f'tiny_1k_pregate{depth}' / 'ckpt'
    how = harness.ensure_checkpoint(ckpt, False, pregate=depth)
    quality.append({'pregate': depth, 'checkpoint': str(ckpt), 'how': how, **(harness.val_loss(ckpt) or {})})
    if depth == 1:
      models[1] = harness.load_store_model(ckpt, ckpt.parent / 'store')
  return models, quality


if __name__ == '__main__':
  sys.exit(main())
