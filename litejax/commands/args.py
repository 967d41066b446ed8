"""Argument types and the arguments every command shares (--config, --set)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (argparse names the flag in its one-line error)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
  return value


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True, checkpoint: bool = False) -> None:
  """--config PATH and repeatable --set section.key=value, shared by every command; with `checkpoint`, --ckpt-dir
  D instead of --config (the config stored with D's newest checkpoint: `config_from_args`)."""
  # With --ckpt-dir the group is not argparse-required: config_from_args says what is missing, in argparse's words.
  where = parser.add_mutually_exclusive_group() if checkpoint else parser
  where.add_argument('--config', required=required and not checkpoint,
                     help='YAML config file, or the name of a shipped one (tiny, tiny_dense, tiny_hier, '
                     'quadrillion, mixtral_8x7b, qwen3_235b_a22b)')
  if checkpoint:
    parser.set_defaults(config_parser=parser)
    where.add_argument('--ckpt-dir', help='use the config stored with this checkpoint folder (litejax train or '
                                          'import-hf) instead of --config')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override one config field; repeatable')


def config_from_args(args: argparse.Namespace):
  """The config of --config (with --set), or the one stored with --ckpt-dir's newest checkpoint (with --set);
  then `args.config` names the checkpoint, for the reports that print it."""
  from litejax.config import InputError, from_dict, load_config, parse_overrides
  if not getattr(args, 'ckpt_dir', None):
    if args.config is None:   # argparse's own error and wording, as when --config alone was required
      args.config_parser.error('the following arguments are required: --config')
    return load_config(args.config, args.overrides)
  from litejax.train.checkpoint import restore_config
  from litejax.train.run_folder import checkpoint_steps, make_paths
  local = make_paths(args.ckpt_dir, None).local_ckpt
  stored = restore_config(args.ckpt_dir) if local is None or checkpoint_steps(local) else None
  if stored is None:
    raise InputError(f'--ckpt-dir {args.ckpt_dir}: holds no checkpoint')
  args.config = f'{args.ckpt_dir} (stored config)'
  overrides = parse_overrides(args.overrides)
  return from_dict(overrides, base=stored) if overrides else stored
