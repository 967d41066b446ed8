"""`litejax calibrate`: measure this CPU and check the latency model against timed forward passes.

Prints the machine's matmul FLOP/s, memory bandwidth and per-kernel overhead, then for several
configs (full forwards, and single-token forwards as decode proxies) the model's predicted step time
(compute + memory + overhead terms; one device, so no communication) beside the measured one, and
whether the model ranks them correctly and lands within [0.67, 1.5] (latency.TRUST_BAND). Timings
are medians of --repeats interleaved rounds over the probes and the steps (litejax.calibrate.calibration says why).
"""
from __future__ import annotations

import argparse
import json
import os

from litejax.commands.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--repeats', type=positive_int, default=5, help='interleaved timing rounds (the median is kept)')
  parser.add_argument('--batch', type=positive_int, default=8, help='sequences per timed forward')
  parser.add_argument('--quick', action='store_true', help='one small config and one token, few repeats (a smoke test)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from litejax.calibrate import calibration
  rep = calibration.calibrate(batch=args.batch, repeats=args.repeats, quick=args.quick)
  if args.json:
    print(json.dumps(rep, indent=2))
  else:
    print('\n'.join(calibration.format_calibration(rep)))
  return 0 if (rep['ranks_correctly'] and rep['within_band']) or args.quick else 1
