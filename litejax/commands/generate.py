"""`litejax generate`: continue prompts with a trained checkpoint (KV cache, dropless MoE decode).

With `--store STORE` the routed experts come from the tiered expert store (litejax.inference.store_decode;
the other weights: litejax.inference.session.load_store_model), and with `--latency-budget-ms X` the
TierSet that fits X is chosen first (litejax.inference.tiersets.choose_for_budget).

JAX is imported only inside `run`, after `--devices` has set XLA_FLAGS (an emulated N-device CPU mesh).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

DEFAULT_CKPT = pathlib.Path('runs') / 'tiny' / 'ckpt'
# Measured on trained configs/tiny_1k.yaml (experiments/lookahead_recall.py; docs/store.md "Lookahead width").
DEFAULT_LOOKAHEAD_WIDTH = 4
# The positions the model can address: litejax.model.layers.rope turns positions into float32 angles, and float32
# holds every integer below 2**24 exactly; past it, neighbouring positions share an angle.
MAX_POSITIONS = 1 << 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--ckpt-dir', help=f'checkpoint folder written by `litejax train` (default: {DEFAULT_CKPT})')
  parser.add_argument('--prompt', help='prompt text')
  parser.add_argument('--prompts', metavar='FILE', help='one prompt per line, decoded as one batch')
  parser.add_argument('--max-new-tokens', type=int, default=200, help='tokens generated per prompt (default 200)')
  parser.add_argument('--temperature', type=float, default=0.0, help='0 (default) = greedy')
  parser.add_argument('--top-k', type=int, default=0, help='sample among the k most likely tokens (0 = off)')
  parser.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling mass (1 = off)')
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  parser.add_argument('--json', action='store_true', help='print one JSON object with texts, tokens and timings')
  parser.add_argument('--devices', type=int, default=1,
                      help='CPU only: emulate N host devices (default 1); ignored on GPU/TPU')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override a field of the stored config (e.g. mesh.expert=2); repeatable')
  _add_store_arguments(parser)


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--store', help='expert store (litejax export-experts): decode from device slots, host '
                                      'cache and disk')
  parser.add_argument('--device-slots', type=float, default=0.05, metavar='F',
                      help='device slots per MoE layer, a fraction of its experts (default 0.05)')
  parser.add_argument('--host-cache', type=float, default=0.1, metavar='F',
                      help='host cache, a fraction of each layer\'s experts (default 0.1)')
  parser.add_argument('--policy', default='lru', help='eviction policy: lru, lfu, group (default lru)')
  parser.add_argument('--lookahead', type=int, default=0, metavar='D',
                      help='prefetch with the routers of the next D MoE layers (default 0; a pre-gated model, '
                           'moe.pregate > 0, prefetches its exact experts instead and takes 0)')
  parser.add_argument('--lookahead-width', type=int, default=DEFAULT_LOOKAHEAD_WIDTH, metavar='W',
                      help='with --lookahead: prefetch the top W*K candidates of the lookahead routing per token '
                           f'and layer (default {DEFAULT_LOOKAHEAD_WIDTH}; docs/store.md "Lookahead width")')
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


def _fail(message: str, status: int = 2) -> int:
  print(f'litejax generate: {" ".join(message.split())}', file=sys.stderr)
  return status


def _damaged(error: Exception, store: str) -> int:
  return _fail(f'{error}; check the whole store with `litejax export-experts --verify {store}`', status=1)


def _skipped(skipped) -> list[dict]:
  """The `checkpoints_skipped` JSON: newer checkpoints passed over for the one decoded with, and why."""
  return [{'step': step, 'why': why} for step, why in skipped]


def _prompts(args) -> list[str]:
  """The prompts of --prompt or --prompts, or InputError naming the flag: an empty prompt, a file with no
  prompt in it, a binary or non-UTF-8 file."""
  from litejax.config import InputError
  if args.prompts:
    path = pathlib.Path(args.prompts)
    if not path.is_file():
      raise InputError(f'--prompts {args.prompts}: no such file')
    data = path.read_bytes()
    if b'\0' in data:
      raise InputError(f'--prompts {args.prompts}: a binary file (NUL bytes), not text with one prompt per line')
    try:
      lines = data.decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
      raise InputError(f'--prompts {args.prompts}: not UTF-8 text (byte {e.start}); save it as UTF-8') from None
    prompts = [line for line in lines if line]
    if not prompts:
      raise InputError(f'--prompts {args.prompts}: holds no prompt (one prompt per non-empty line)')
    return prompts
  if args.prompt is None:
    raise InputError('give --prompt TEXT or --prompts FILE (one prompt per non-empty line)')
  if not args.prompt:
    raise InputError('--prompt: must not be empty (the model continues the prompt\'s bytes)')
  return [args.prompt]


def _check_flags(args, prompts: list[str]) -> None:
  """Every flag that can be checked before a checkpoint or store is read (InputError naming it)."""
  from litejax.config import InputError
  longest = max(len(p.encode('utf-8')) for p in prompts)     # byte-level tokens
  if longest + args.max_new_tokens > MAX_POSITIONS:
    raise InputError(f'--max-new-tokens: the prompt ({longest} tokens) plus {args.max_new_tokens:,} new tokens pass '
                     f'the {MAX_POSITIONS:,} positions the model can address')
  if args.latency_budget_ms is not None and not args.latency_budget_ms > 0:
    raise InputError(f'--latency-budget-ms: must be > 0, got {args.latency_budget_ms}')
  if args.val_batches < 1:
    raise InputError(f'--val-batches: must be >= 1, got {args.val_batches}')


def run(args: argparse.Namespace) -> int:
  from litejax.env import set_cpu_device_count
  if args.devices < 1:
    return _fail(f'--devices: must be >= 1, got {args.devices}')
  if args.max_new_tokens < 1:
    return _fail(f'--max-new-tokens: must be >= 1, got {args.max_new_tokens}')
  ckpt_dir = pathlib.Path(args.ckpt_dir) if args.ckpt_dir else DEFAULT_CKPT
  if not ckpt_dir.is_dir() and not args.store:
    return _fail(f'no checkpoint in {ckpt_dir}: run `litejax train` first (or pass --ckpt-dir)')
  prompts = _prompts(args)
  set_cpu_device_count(args.devices)   # no-op when jax is already imported (in-process tests)

  import jax
  from litejax.inference.sampling import Sampling
  from litejax.train import tokenizer as tokenizers
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  try:
    sampling.validate()
  except ValueError as e:
    return _fail(f'--{str(e).replace("_", "-")}')
  _check_flags(args, prompts)
  if args.store:
    return _run_store(args, prompts, sampling)
  from litejax.inference import session as generation
  from litejax.train.checkpoint import CheckpointCorruptError, CheckpointInFlightError
  try:
    cpu = jax.devices()[0].platform == 'cpu'
    session = generation.load(ckpt_dir, args.overrides, jax.devices()[:args.devices] if cpu else None)
  except FileNotFoundError as e:
    return _fail(str(e))
  except (CheckpointCorruptError, CheckpointInFlightError) as e:
    return _fail(str(e), status=1)
  tok = tokenizers.for_checkpoint(ckpt_dir)   # an imported model's tokenizer.json, else bytes
  if tok.kind == 'bytes' and session.cfg.model.vocab_size < 256:
    return _fail(f'the checkpoint has vocab_size {session.cfg.model.vocab_size}; byte prompts need 256')
  tokens = [tok.encode(p).astype(int).tolist() for p in prompts]
  gen = session.generate(tokens, args.max_new_tokens, sampling, args.seed)
  split = None
  if args.json:   # compiles the step once more from abstract shapes: only when it is printed
    from litejax.analysis.decode_bound import runtime_latency_split
    from litejax.perf.host import measure_host
    with jax.set_mesh(session.mesh):
      split = runtime_latency_split(session.runtime, measure_host(repeats=3))
  texts = [tok.decode(t) for t in gen.tokens]
  if args.json:
    steps_ms = [1e3 * s for s in gen.step_s]
    q = (lambda p: float(statistics.quantiles(steps_ms, n=100, method='inclusive')[p - 1])  # noqa: E731
         if len(steps_ms) > 1 else (steps_ms[0] if steps_ms else None))
    if split is not None and q(50):   # the prediction beside the measurement, for the same step
      split = {**split, 'measured_ms_per_token': q(50),
               'predicted_over_measured': split['predicted_ms_per_token'] / q(50)}
    out = {'texts': texts, 'tokens': gen.tokens, 'ttft_ms': 1e3 * gen.ttft_s,
           'ms_per_token_p50': q(50), 'ms_per_token_p99': q(99),
           'tokens_per_second': (len(prompts) * len(gen.step_s) / sum(gen.step_s)) if gen.step_s else None,
           'compiles': gen.compiles, 'latency_split': split, 'interrupted': gen.interrupted,
           'batch': session.runtime.batch if session.runtime else None,
           'checkpoint_step': session.step, 'checkpoints_skipped': _skipped(session.skipped)}
    print(json.dumps(out, indent=2, default=float))
  else:
    for prompt, text in zip(prompts, texts):
      print(prompt + text)
  if gen.interrupted:
    print('litejax generate: interrupted; printed what was generated so far', file=sys.stderr)
    return 130
  return 0


def _run_store(args, prompts: list[str], sampling) -> int:
  from litejax.inference import tiersets
  from litejax.inference.session import load_store_model
  from litejax.inference.store.layout import ChunkDamagedError, ExpertStoreError
  from litejax.inference.store.levels import ExpertLevels, LevelOptions
  from litejax.inference.store.quant import int8_copies
  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store_decode import StoreRuntime
  from litejax.inference.store_programs import build_programs
  from litejax.train import tokenizer as tokenizers
  from litejax.train.checkpoint import CheckpointCorruptError, CheckpointInFlightError
  opts = LevelOptions(args.device_slots, args.host_cache, args.policy, args.lookahead, args.miss,
                     args.lookahead_width, stage=not args.no_stage)
  try:
    opts.validate()
    cfg, model, store, source, skipped = load_store_model(args.store, args.ckpt_dir, args.overrides)
  except (ValueError, ExpertStoreError, FileNotFoundError) as e:
    return _fail(str(e))
  except (CheckpointCorruptError, CheckpointInFlightError) as e:
    return _fail(str(e), status=1)
  tok = tokenizers.for_checkpoint(args.ckpt_dir or ExpertStore.read_source(args.store).get('ckpt_dir'))
  tokens = [tok.encode(p).astype(int).tolist() for p in prompts]
  if cfg.moe.pregate and opts.lookahead:
    return _fail(f'--lookahead: the model is pre-gated (moe.pregate={cfg.moe.pregate}): its experts are fetched '
                 f'exactly {cfg.moe.pregate} MoE layer(s) ahead and no lookahead routers run; use --lookahead 0')
  tierset, programs = None, build_programs()   # one set: the budget's recorded step and the decode
  if args.latency_budget_ms is not None:
    from litejax.perf.host import measure_host
    try:
      tierset, opts = tiersets.choose_for_budget(
          cfg, model, store, opts, batch=len(prompts), cache_len=max(len(t) for t in tokens) + args.max_new_tokens,
          budget_ms=args.latency_budget_ms, num_val_batches=args.val_batches,
          io_probes=lambda: io_probes(args.store, store), chip=measure_host(repeats=3),
          programs=programs)
    except ChunkDamagedError as e:
      return _damaged(e, args.store)
    except ValueError as e:
      return _fail(str(e))
  try:   # every read checks each chunk: a damaged one stops here, naming layer, array and expert
    tiers = ExpertLevels(store, opts, load_width=cfg.moe.k_active * len(prompts),
                         int8=int8_copies(store) if opts.miss == 'fallback' else None)
    try:
      if tierset is not None:
        tiersets.preload(cfg, tiers)
      rt = StoreRuntime(cfg, model, tiers, None if tierset is None else tierset['mask'], programs=programs)
      gen, _ = rt.generate(tokens, args.max_new_tokens, sampling, args.seed)
    finally:
      tiers.close()
  except ChunkDamagedError as e:
    return _damaged(e, args.store)
  generated = sum(len(t) for t in gen.tokens)
  rep = tiers.report(len(prompts) * len(gen.step_s), rt.decode_stall_s, rt.decode_io_wait_s, rt.prefill_counters)
  rep['weights'] = source
  texts = [tok.decode(t) for t in gen.tokens]
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
           'store': rep, 'checkpoints_skipped': _skipped(skipped)}
    if tierset is not None:
      out['tierset'] = tiersets.report(tierset, mean)
    print(json.dumps(out, indent=2, default=float))
  else:
    for prompt, text in zip(prompts, texts):
      print(prompt + text)
  return 0


def io_probes(location: str, store) -> dict[str, float]:
  """This machine's host and disk bandwidth (the disk probe's file in the store's folder when it is local)
  and the store's per-expert read and slot-load times (litejax.calibrate.calibration)."""
  from litejax.calibrate import calibration
  path = pathlib.Path(location.removeprefix('file://'))
  return {**calibration.measure_level_bandwidth(directory=str(path) if path.is_dir() else None),
          **calibration.measure_expert_ops(store)}
