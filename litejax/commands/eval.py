"""`litejax eval`: mean loss per predicted token and perplexity of a checkpoint on a text or token file.

  litejax eval --ckpt-dir runs/tiny/ckpt --data corpus.txt --seq-len 128 --json

Text is tokenized with the checkpoint's tokenizer (an imported model's tokenizer.json, else bytes); `.bin` /
`.u32.bin` files are tokens, as `train --data` reads them. The windows and the loss: litejax.inference.evaluate.
JAX is imported only inside `run`, after `--devices` has set XLA_FLAGS.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from litejax.commands.args import positive_int
  parser.add_argument('--ckpt-dir', required=True, help='checkpoint folder (litejax train or import-hf)')
  parser.add_argument('--data', required=True, help='text file, folder of .txt, or uint16/uint32 .bin tokens')
  parser.add_argument('--seq-len', type=positive_int, help='window length S (default: model.seq_len); each '
                      'window predicts its tokens 2..S')
  parser.add_argument('--batch', type=positive_int, help='windows per forward (default: one per batch rank)')
  parser.add_argument('--devices', type=positive_int, default=1,
                      help='CPU only: emulate N host devices (default 1); ignored on GPU/TPU')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override a field of the stored config (e.g. mesh.expert=2); repeatable')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
  from litejax.config import InputError
  from litejax.env import set_cpu_device_count
  ckpt_dir = pathlib.Path(args.ckpt_dir).expanduser()
  if not ckpt_dir.is_dir():
    raise InputError(f'--ckpt-dir {ckpt_dir}: no such checkpoint folder')
  if not pathlib.Path(args.data).expanduser().exists():
    raise InputError(f'--data {args.data}: no such file or folder')
  if args.seq_len is not None and args.seq_len < 2:
    raise InputError(f'--seq-len: must be >= 2 (a token and the one it predicts), got {args.seq_len}')
  set_cpu_device_count(args.devices)   # no-op when jax is already imported (in-process tests)

  import jax
  from litejax.inference import evaluate, session as sessions
  from litejax.train import data, tokenizer as tokenizers
  from litejax.train.progress import count_bar
  t0 = time.time()
  cpu = jax.devices()[0].platform == 'cpu'
  try:
    session = sessions.load(ckpt_dir, args.overrides, jax.devices()[:args.devices] if cpu else None)
  except FileNotFoundError as e:
    raise InputError(str(e)) from None
  cfg = session.cfg
  tok = tokenizers.for_checkpoint(ckpt_dir)
  try:
    tokens = data.load_tokens(args.data, vocab_size=cfg.model.vocab_size, encode_text=tokenizers.text_encoder(ckpt_dir))
  except (OSError, ValueError) as e:
    raise InputError(f'--data: {e}') from None
  seq_len = args.seq_len or cfg.model.seq_len
  with count_bar('eval', not args.quiet) as progress:
    try:
      result = evaluate.evaluate(session, tokens, seq_len, args.batch, progress)
    except ValueError as e:
      raise InputError(str(e)) from None
  seconds = time.time() - t0
  out = {'loss': result.loss, 'perplexity': result.perplexity, 'tokens': result.tokens, 'windows': result.windows,
         'seq_len': result.seq_len, 'tokenizer': tok.kind, 'data': str(args.data), 'step': session.step,
         'seconds': round(seconds, 3)}
  if args.json:
    print(json.dumps(out, indent=2))
  else:
    print(f'loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f} over {result.tokens:,} predicted '
          f'tokens ({result.windows:,} windows of {seq_len}; {tok.kind} tokenizer; step {session.step})')
  return 0
