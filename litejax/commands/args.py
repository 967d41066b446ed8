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


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """--config PATH and repeatable --set section.key=value, shared by every command."""
  parser.add_argument('--config', required=required,
                      help='YAML config file, or the name of a shipped one (tiny, tiny_dense, tiny_hier, '
                      'quadrillion)')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override one config field; repeatable')
