"""`litejax generate`: continue prompts with a trained checkpoint (KV cache, dropless MoE decode).

JAX is imported only inside `run`, after `--devices` has set XLA_FLAGS (an emulated N-device CPU mesh).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

DEFAULT_CKPT = pathlib.Path('runs') / 'tiny' / 'ckpt'


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
  from litejax.commands import generate_store
  generate_store.add_arguments(parser)


def _fail(message: str) -> int:
  print(f'litejax generate: {message}', file=sys.stderr)
  return 2


def _prompts(args) -> list[str] | None:
  if args.prompts:
    lines = pathlib.Path(args.prompts).read_text(encoding='utf-8').splitlines()
    return [line for line in lines if line]
  return [args.prompt] if args.prompt else None


def run(args: argparse.Namespace) -> int:
  from litejax.env import set_cpu_device_count
  if args.devices < 1:
    return _fail('--devices must be >= 1')
  if args.max_new_tokens < 1:
    return _fail(f'--max-new-tokens must be >= 1, got {args.max_new_tokens}')
  ckpt_dir = pathlib.Path(args.ckpt_dir) if args.ckpt_dir else DEFAULT_CKPT
  if not ckpt_dir.is_dir() and not args.store:
    return _fail(f'no checkpoint in {ckpt_dir}: run `litejax train` first (or pass --ckpt-dir)')
  if args.prompts and not pathlib.Path(args.prompts).is_file():
    return _fail(f'--prompts {args.prompts}: no such file')
  prompts = _prompts(args)
  if not prompts:
    return _fail('give --prompt TEXT or --prompts FILE (one prompt per non-empty line)')
  set_cpu_device_count(args.devices)   # no-op when jax is already imported (in-process tests)

  import jax
  from litejax.train import data
  from litejax.inference.sampling import Sampling
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  try:
    sampling.validate()
  except ValueError as e:
    return _fail(f'--{str(e).replace("_", "-")}')
  if args.store:
    from litejax.commands.generate_store import run_store
    return run_store(args, prompts, sampling, _fail)
  from litejax.inference import session as generation
  try:
    cpu = jax.devices()[0].platform == 'cpu'
    session = generation.load(ckpt_dir, args.overrides, jax.devices()[:args.devices] if cpu else None)
  except FileNotFoundError as e:
    return _fail(str(e))
  if session.cfg.model.vocab_size < 256:
    return _fail(f'the checkpoint has vocab_size {session.cfg.model.vocab_size}; byte prompts need 256')
  tokens = [data.encode(p).astype(int).tolist() for p in prompts]
  gen = session.generate(tokens, args.max_new_tokens, sampling, args.seed)
  split = None
  if args.json:   # compiles the step once more from abstract shapes: only when it is printed
    from litejax.analysis.decode_bound import runtime_latency_split
    from litejax.perf.host import measure_host
    with jax.set_mesh(session.mesh):
      split = runtime_latency_split(session.runtime, measure_host(repeats=3))
  texts = [data.decode(t) for t in gen.tokens]
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
           'batch': session.runtime.batch if session.runtime else None}
    print(json.dumps(out, indent=2, default=float))
  else:
    for prompt, text in zip(prompts, texts):
      print(prompt + text)
  if gen.interrupted:
    print('litejax generate: interrupted; printed what was generated so far', file=sys.stderr)
    return 130
  return 0
