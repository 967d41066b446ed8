"""Why `litejax bound` compiles with xla_backend_optimization_level=0 (litejax.analysis.bound.ANALYSIS_COMPILER_OPTIONS):
the optimized HLO text and memory_analysis() are the same at LLVM level 0 and the default, and the
compile is faster. Compiles configs/tiny.yaml (forward and scanned train step) both ways and prints
whether each program's HLO and memory figures match, and both compile times.

    python experiments/analysis_opt_level.py [--devices 8] [--json]
"""
from __future__ import annotations

import json
import sys
import time

import harness
from litejax.env import set_cpu_device_count

PROGRAMS = {'forward': ([], False), 'train_scanned': (['model.scan_layers=true'], True)}


def compare(cfg, train: bool) -> dict:
  from litejax.analysis import bound as bound_report, core
  row = {}
  # Default first: the first compile of a process also pays jax's start-up, which then counts
  # against the default, not against level 0.
  for name, options in (('default', {}), ('level0', bound_report.ANALYSIS_COMPILER_OPTIONS)):
    t0 = time.perf_counter()
    prog = bound_report.compile_program(cfg, train=train, compiler_options=options)
    row[name] = {'seconds': time.perf_counter() - t0, 'hlo': prog.hlo_text,
                 'memory': core.memory_per_device(prog.compiled)}
  return {'same_hlo': row['level0']['hlo'] == row['default']['hlo'],
          'same_memory': row['level0']['memory'] == row['default']['memory'],
          'compile_seconds_level0': row['level0']['seconds'], 'compile_seconds_default': row['default']['seconds']}


def main(argv=None) -> int:
  ap = harness.parser(__doc__, out='none')
  ap.add_argument('--devices', type=int, default=8)
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  set_cpu_device_count(args.devices, cpu_only=True)
  from litejax.config import load_config
  out = {}
  for name, (overrides, train) in PROGRAMS.items():
    out[name] = compare(load_config(str(harness.REPO / 'configs' / 'tiny.yaml'), overrides), train)
    if not args.json:
      r = out[name]
      print(f"{name:14s} same HLO {r['same_hlo']}, same memory {r['same_memory']}, compile "
            f"{r['compile_seconds_level0']:.1f}s at level 0 vs {r['compile_seconds_default']:.1f}s default")
  if args.json:
    print(json.dumps(out, indent=2))
  return 0 if all(r['same_hlo'] and r['same_memory'] for r in out.values()) else 1


if __name__ == '__main__':
  sys.exit(main())
