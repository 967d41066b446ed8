"""The `litejax` console script: one subcommand per module in litejax/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `litejax params` never pays for what `litejax train` needs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from litejax.config import ConfigError

# name -> (module, one-line help)
COMMANDS = {
    'params': ('litejax.commands.params', 'parameter counts and the analytic per-token bound'),
    'plan': ('litejax.commands.plan', 'smallest TPU slice of a generation where a config fits, per-chip report'),
    'calibrate': ('litejax.commands.calibrate', 'measure this CPU and check the latency model on timed configs'),
    'bound': ('litejax.commands.bound', 'compile from abstract shapes; compiled vs analytic FLOPs/token'),
    'train': ('litejax.commands.train', 'train a config on the embedded corpus (or --data) with checkpoints'),
    'generate': ('litejax.commands.generate', 'continue prompts from a checkpoint (KV cache, dropless MoE)'),
}


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """--config PATH and repeatable --set section.key=value, shared by every command."""
  parser.add_argument('--config', required=required, help='YAML config file (e.g. configs/tiny.yaml)')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override one config field; repeatable')


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog='litejax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', metavar='COMMAND')
  # Only the chosen command's module is imported; the rest get a stub parser for --help.
  chosen = next((a for a in argv if not a.startswith('-')), None)
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    if name == chosen:
      importlib.import_module(module).add_arguments(p)
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
  except ConfigError as e:
    print(f'litejax {args.command}: config error: {e}', file=sys.stderr)
    return 2
  except BrokenPipeError:   # output piped into `head` and closed: not an error worth a traceback
    sys.stdout = None
    return 0


if __name__ == '__main__':
  sys.exit(main())
