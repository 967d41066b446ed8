"""`litejax import-hf`: a Hugging Face model folder (Mixtral, Qwen3-MoE, DeepSeek-V3) into a litejax checkpoint folder.

  litejax import-hf ~/models/Mixtral-8x7B-v0.1 --out runs/mixtral/ckpt --store runs/mixtral/store --dtype bfloat16

Everything is checked before anything is written (litejax.hf.importer); an existing checkpoint folder or store
is replaced only with --overwrite. The folder then works with --ckpt-dir alone in generate, eval, bound, plan,
params and train --resume (with --store: generate --store, which finds the checkpoint in the store's manifest).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from litejax.commands.args import positive_int
  parser.add_argument('hf_dir', metavar='HF_DIR', help='folder with config.json, safetensors and tokenizer.json')
  parser.add_argument('--out', required=True, metavar='CKPT_DIR', help='the litejax checkpoint folder to write')
  parser.add_argument('--store', help='write the routed experts into this expert store, expert by expert '
                                      '(the checkpoint then holds the other weights only)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      help='parameter and compute dtype (default: the one config.json names, else float32)')
  parser.add_argument('--seq-len', type=positive_int,
                      help='model.seq_len: eval windows, bound and train (default: max_position_embeddings, at '
                           'most 4096)')
  parser.add_argument('--no-tokenizer', action='store_true',
                      help='import without tokenizer.json (text is then byte-level)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing checkpoint folder / store')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
  from litejax.env import set_cpu_device_count
  set_cpu_device_count(1)
  from litejax.train.progress import count_bar
  from litejax.hf.importer import import_hf
  with count_bar('import', not args.quiet) as progress:
    rep = import_hf(args.hf_dir, args.out, store=args.store, dtype=args.dtype, seq_len=args.seq_len,
                    overwrite=args.overwrite, tokenizer=not args.no_tokenizer, progress=progress)
  if args.json:
    print(json.dumps(rep, indent=2))
  else:
    where = f' and {rep["experts"]:,} experts into {rep["store"]}' if rep['store'] else ''
    print(f'imported {rep["architecture"]} ({", ".join(rep["layouts"]) or "no expert"} layout, {rep["dtype"]}) into '
          f'{rep["out"]}{where}: {rep["bytes_read"] / 2**30:.2f} GiB in {rep["seconds"]:.1f} s '
          f'({rep["gb_per_s"]:.2f} GB/s)' + ('' if rep['tokenizer'] else '; no tokenizer (byte-level text)'))
    skipped = rep.get('not_modelled')
    if skipped:     # e.g. DeepSeek-V3's multi-token-prediction layer: said, never dropped silently
      print(f'not imported: {skipped["tensors"]:,} tensors under {", ".join(skipped["prefixes"])} ({skipped["why"]})')
  return 0
