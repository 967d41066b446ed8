"""`litejax export-experts`: write an expert store (issue 13) from a checkpoint or random initialisation.

  litejax export-experts --ckpt-dir runs/x/ckpt --out store/            # a trained checkpoint's experts
  litejax export-experts --init --config configs/store_1b.yaml --seed 0 --out store/
  litejax export-experts --verify store/                                # read every chunk, list damaged ones

Everything is validated before anything is written; an existing store is replaced only with --overwrite; a
second export into the same folder is refused while the first runs (an flock on STORE/export.lock).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from litejax.commands.args import add_config_arguments
from litejax.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser, required=False)
  parser.add_argument('--out', help='store location: a directory or a TensorStore kvstore URL (required unless '
                      '--verify)')
  parser.add_argument('--ckpt-dir', help='export the routed experts of this training checkpoint directory')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the newest)')
  parser.add_argument('--init', action='store_true', help='write randomly initialised experts of --config')
  parser.add_argument('--seed', type=int, default=0, help='seed of --init')
  parser.add_argument('--block-mib', type=float, default=64.0, help='--init: experts generated per block, in MiB')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing expert store at --out')
  parser.add_argument('--verify', metavar='STORE', help='write nothing: read every chunk of STORE, check its '
                      'checksum, and list each damaged one (exit status 1 if any)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def _check(args: argparse.Namespace) -> None:
  if args.verify is not None:
    given = [f for f, v in (('--out', args.out), ('--ckpt-dir', args.ckpt_dir), ('--init', args.init),
                            ('--config', args.config), ('--set', args.overrides), ('--step', args.step),
                            ('--overwrite', args.overwrite)) if v]
    if given:
      raise ConfigError(f'export-experts --verify STORE: writes nothing; drop {", ".join(given)}')
    return
  if not args.out:
    raise ConfigError('export-experts: --out STORE is required (or --verify STORE to check a store)')
  if bool(args.init) == bool(args.ckpt_dir):
    raise ConfigError('export-experts: give exactly one of --ckpt-dir D or --init --config C')
  if args.init and not args.config:
    raise ConfigError('export-experts --init: --config is required')
  if args.ckpt_dir and (args.config or args.overrides):
    raise ConfigError('export-experts --ckpt-dir: the config comes from the checkpoint; drop --config/--set')
  if args.block_mib <= 0:
    raise ConfigError(f'--block-mib: must be > 0, got {args.block_mib}')
  if args.seed < 0:
    raise ConfigError(f'--seed: must be >= 0, got {args.seed}')


def run(args: argparse.Namespace) -> int:
  from litejax.inference.store.layout import ExpertStoreError, StoreWriteError
  _check(args)
  t0 = time.time()
  if args.verify is not None:
    return _verify(args.verify, args.json, t0)
  try:
    if args.init:
      from litejax.inference.store.writer import write_random
      cfg = load_config(args.config, args.overrides)
      store = write_random(args.out, cfg, args.seed, overwrite=args.overwrite,
                           block_bytes=int(args.block_mib * (1 << 20)))
    else:
      from litejax.inference.store.from_checkpoint import write_from_checkpoint
      store = write_from_checkpoint(args.out, args.ckpt_dir, args.step, overwrite=args.overwrite)
  except ExpertStoreError as e:
    print(f'litejax export-experts: {e}', file=sys.stderr)
    return 1 if isinstance(e, StoreWriteError) else 2
  n = store.num_experts * len(store.layers)
  out = {'out': args.out, 'layers': store.layers, 'experts_per_layer': store.num_experts,
         'expert_bytes': store.expert_bytes, 'bytes_total': n * store.expert_bytes,
         'source': store.manifest['source'], 'seconds': round(time.time() - t0, 2)}
  if args.json:
    print(json.dumps(out, indent=2))
  else:
    print(f"wrote {n:,} experts ({len(store.layers)} layers x {store.num_experts:,}) of {store.expert_bytes:,} B "
          f"= {out['bytes_total'] / 2**30:.2f} GiB to {args.out} in {out['seconds']} s")
  return 0


def _verify(location: str, as_json: bool, t0: float) -> int:
  """`--verify STORE`: every chunk read and checked; one line per damaged chunk; 1 if any, 0 if none."""
  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store.layout import ExpertStoreError, reexport_hint
  try:
    store = ExpertStore.open(location)
    damaged = store.damaged_chunks()
  except ExpertStoreError as e:
    print(f'litejax export-experts: {e}', file=sys.stderr)
    return 2
  chunks = len(store.layers) * len(store.shapes) * store.num_experts
  if as_json:
    print(json.dumps({'store': location, 'chunks': chunks, 'damaged': [
        {'layer': d.layer, 'array': d.array, 'expert': d.expert, 'error': str(d)} for d in damaged],
        'seconds': round(time.time() - t0, 2)}, indent=2))
  else:
    for d in damaged:
      print(f'damaged: {d}')
    print(f'checked {chunks:,} chunks ({len(store.layers)} layers x {len(store.shapes)} arrays x '
          f'{store.num_experts:,} experts) of {location}: ' +
          (f'{len(damaged)} damaged; re-export it: `{reexport_hint(location, store.manifest["source"])}`'
           if damaged else 'all intact'))
  return 1 if damaged else 0
