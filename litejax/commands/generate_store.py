"""`litejax generate --store STORE ...`: decoding with the routed experts in the tiered store
(litejax.inference.store_decode). The other weights come from --ckpt-dir when it holds a checkpoint, else (a store
written by `export-experts --init`) they are initialised from the store's config and seed.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

# Measured on trained configs/tiny_1k.yaml (experiments/lookahead_recall.py; README "Lookahead width").
DEFAULT_LOOKAHEAD_WIDTH = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--store', help='expert store (litejax export-experts): decode from device slots, host '
                                      'cache and disk')
  parser.add_argument('--device-slots', type=float, default=0.05, metavar='F',
                      help='device slots per MoE layer, a fraction of its experts (default 0.05)')
  parser.add_argument('--host-cache', type=float, default=0.1, metavar='F',
                      help='host cache, a fraction of each layer\'s experts (default 0.1)')
  parser.add_argument('--policy', default='lru', help='eviction policy: lru, lfu, group (default lru)')
  parser.add_argument('--lookahead', type=int, default=0, metavar='D',
                      help='prefetch with the routers of the next D MoE layers (default 0)')
  parser.add_argument('--lookahead-width', type=int, default=DEFAULT_LOOKAHEAD_WIDTH, metavar='W',
                      help='with --lookahead: prefetch the top W*K candidates of the lookahead routing per token '
                           f'and layer (default {DEFAULT_LOOKAHEAD_WIDTH}; README "Lookahead width")')
  parser.add_argument('--no-stage', action='store_true',
                      help='with --lookahead: prefetch into the host tier only, do not stage predicted experts '
                           'into device slots')
  parser.add_argument('--miss', default='stall', help='stall (exact) or fallback (int8 copy; default stall)')
  parser.add_argument('--plot', metavar='PNG', help='with --store: write the store metrics plot here')
  parser.add_argument('--latency-budget-ms', type=float, metavar='X',
                      help='with --store: decode with the TierSet (store.placement: hot, hot+warm, all) whose '
                           'predicted per-token latency fits X ms and whose validation loss is least; device '
                           'slots and host cache are then sized and filled by the placement')
  parser.add_argument('--val-batches', type=int, default=2, metavar='N',
                      help='with --latency-budget-ms: validation batches per TierSet (default 2)')


def _session_model(args, store_location: str):
  """(cfg, model with concrete non-expert weights, store, where the weights came from)."""
  import jax
  from flax import nnx

  from litejax.inference import session as generation
  from litejax.config import from_dict, parse_overrides
  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store_decode import model_without_experts
  source = ExpertStore.read_source(store_location)
  ckpt = pathlib.Path(args.ckpt_dir) if args.ckpt_dir else None
  if ckpt is None and source.get('kind') == 'checkpoint':
    # A store exported from a checkpoint holds only its experts: the other weights must come from the
    # same checkpoint, never from a fresh initialisation (that would decode garbage, silently).
    ckpt = pathlib.Path(source['ckpt_dir'])
    if not ckpt.is_dir():
      raise FileNotFoundError(f"--store {store_location}: its experts come from checkpoint {ckpt} (step "
                              f"{source.get('step')}), which is not there: pass --ckpt-dir with that checkpoint")
  if ckpt is not None and ckpt.is_dir():
    session = generation.load(ckpt, args.overrides, jax.devices()[:1])
    if source.get('kind') == 'checkpoint' and 'step' in source and int(source['step']) != session.step:
      raise ValueError(f"--store {store_location} holds the experts of step {source['step']} but --ckpt-dir "
                       f"{ckpt} restored step {session.step}: re-export with `litejax export-experts --ckpt-dir "
                       f"{ckpt} --out STORE`, or pass the checkpoint the store came from")
    store = ExpertStore.open(store_location, session.cfg)
    graphdef = nnx.split(_abstract(session.cfg), nnx.Param, ...)[0]
    params, extra = jax.device_get((session.params, session.extra))
    return session.cfg, nnx.merge(graphdef, params, extra), store, f'checkpoint {ckpt}'
  if ckpt is not None:
    raise FileNotFoundError(f'--ckpt-dir {ckpt}: no such checkpoint folder')
  store = ExpertStore.open(store_location)
  cfg = from_dict(store.manifest['config'])
  if args.overrides:
    cfg = from_dict(parse_overrides(args.overrides), base=cfg)
  seed = int(store.manifest.get('source', {}).get('seed', 0))
  return cfg, model_without_experts(cfg, seed), store, f'initialised (seed {seed}): the store has no checkpoint'


def _abstract(cfg):
  from litejax.model.transformer import abstract_model
  return abstract_model(cfg)


def run_store(args, prompts: list[str], sampling, fail) -> int:
  from litejax.train import data
  from litejax.inference.store.layout import ExpertStoreError
  from litejax.inference.store.levels import ExpertLevels, LevelOptions, int8_copies
  from litejax.inference.store_decode import StoreRuntime
  opts = LevelOptions(args.device_slots, args.host_cache, args.policy, args.lookahead, args.miss,
                     args.lookahead_width, stage=not args.no_stage)
  try:
    opts.validate()
    cfg, model, store, source = _session_model(args, args.store)
  except (ValueError, ExpertStoreError, FileNotFoundError) as e:
    return fail(str(e))
  tokens = [data.encode(p).astype(int).tolist() for p in prompts]
  tierset = None
  if args.latency_budget_ms is not None:
    from litejax.commands import generate_tierset
    try:
      tierset, opts = generate_tierset.choose(args, cfg, model, store, opts, len(prompts),
                                              max(len(t) for t in tokens) + args.max_new_tokens)
    except ValueError as e:
      return fail(str(e))
  tiers = ExpertLevels(store, opts, load_width=cfg.moe.k_active * len(prompts),
                int8=int8_copies(store) if opts.miss == 'fallback' else None)
  try:
    if tierset is not None:
      generate_tierset.preload(cfg, tiers)
    rt = StoreRuntime(cfg, model, tiers, None if tierset is None else tierset['mask'])
    gen, _ = rt.generate(tokens, args.max_new_tokens, sampling, args.seed)
  finally:
    tiers.close()
  generated = sum(len(t) for t in gen.tokens)
  rep = tiers.report(len(prompts) * len(gen.step_s), rt.decode_stall_s)
  rep['weights'] = source
  texts = [data.decode(t) for t in gen.tokens]
  if args.plot:
    from litejax.inference.store.plot import plot_store
    plot_store(rep, gen.step_s, rt.step_stall_s, args.plot)
  if args.json:
    steps_ms = [1e3 * s for s in gen.step_s]
    io_ms = statistics.median(1e3 * s for s in rt.step_stall_s) if steps_ms else 0.0
    mean = statistics.median(steps_ms) if steps_ms else None   # the median: the first step compiles
    out = {'texts': texts, 'tokens': gen.tokens, 'ttft_ms': 1e3 * gen.ttft_s,
           'ms_per_token_p50': statistics.median(steps_ms) if steps_ms else None,
           'tokens_per_second': (len(prompts) * len(gen.step_s) / sum(gen.step_s)) if gen.step_s else None,
           'compiles': gen.compiles, 'batch': len(prompts), 'generated': generated,
           # measured: I/O = time inside the tier lookups (disk reads, waits, slot loads) per decode step
           'latency_split': {'measured_ms_per_step_p50': mean, 'io_ms_per_step_p50': io_ms,
                             'compute_ms_per_step_p50': None if mean is None else mean - io_ms},
           'store': rep}
    if tierset is not None:
      out['tierset'] = generate_tierset.report(tierset, mean)
    print(json.dumps(out, indent=2, default=float))
  else:
    for prompt, text in zip(prompts, texts):
      print(prompt + text)
  return 0
