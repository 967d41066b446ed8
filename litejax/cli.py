"""The `litejax` console script: one subcommand per module in litejax/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `litejax params` never pays for what `litejax train` needs.

Bad input (`litejax.config.InputError`, its `ConfigError`, and argparse's own errors) ends in exit
status 2 and one line on stderr naming the field or path and the constraint.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings

from litejax.config import ConfigError, InputError
from litejax.env import quiet_libtpu

# name -> (module, one-line help)
COMMANDS = {
    'params': ('litejax.commands.params', 'parameter counts and the analytic per-token bound'),
    'plan': ('litejax.commands.plan', 'smallest TPU slice of a generation where a config fits, per-chip report'),
    'calibrate': ('litejax.commands.calibrate', 'measure this CPU and check the latency model on timed configs'),
    'bound': ('litejax.commands.bound', 'compile from abstract shapes; compiled vs analytic FLOPs/token'),
    'train': ('litejax.commands.train', 'train a config on the embedded corpus (or --data) with checkpoints'),
    'generate': ('litejax.commands.generate', 'continue prompts from a checkpoint (KV cache, dropless MoE)'),
    'export-experts': ('litejax.commands.export_experts', 'write an expert store from a checkpoint or random init'),
    'eval': ('litejax.commands.eval', 'mean loss per token and perplexity of a checkpoint on a text or token file'),
    'import-hf': ('litejax.commands.import_hf', 'a Hugging Face Mixtral / Qwen3-MoE folder into a litejax checkpoint'),
    'export-hf': ('litejax.commands.export_hf', 'a litejax checkpoint as a Hugging Face folder transformers loads'),
}


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (`litejax train: --steps: invalid int value: 'x'`)."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: {message}\n')


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _warnings_as_lines(command: str):
  """Library warnings (a damaged checkpoint skipped, ...) as one line each, `litejax CMD: warning: ...`,
  instead of Python's two-line form plus litejax's log record of the same message."""
  def show(message, category, filename, lineno, file=None, line=None):
    print(f'litejax {command}: warning: {_one_line(message)}', file=sys.stderr)

  logger, null = logging.getLogger('litejax'), logging.NullHandler()
  with warnings.catch_warnings():
    warnings.showwarning = show
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(null)
    try:
      yield
    finally:
      logger.removeHandler(null)
      logger.propagate = propagate


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  quiet_libtpu()
  parser = _Parser(prog='litejax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_Parser)
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
    with _warnings_as_lines(args.command):
      return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
  except ConfigError as e:
    print(f'litejax {args.command}: config error: {_one_line(e)}', file=sys.stderr)
    return 2
  except InputError as e:
    print(f'litejax {args.command}: {_one_line(e)}', file=sys.stderr)
    return 2
  except BrokenPipeError:   # output piped into `head` and closed: not an error worth a traceback
    sys.stdout = None
    return 0


if __name__ == '__main__':
  sys.exit(main())
