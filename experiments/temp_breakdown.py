"""What the sparse train step's temporaries are: the largest buffers of XLA's buffer assignment.

Compiles the train step of configs/quadrillion.yaml shrunk (fewer layers, smaller d and h; the same
tiers, groups, experts, K, tokens and 8-way expert parallelism) on 8 emulated CPU devices with
`--xla_dump_to`, reads XLA's memory-usage report and prints JSON: `memory_analysis()` temp bytes, the
touched experts' parameter bytes per device for comparison (u rows of each expert table per layer, in
the parameter dtype) and the largest allocations with the shapes of the values they hold.

    python experiments/temp_breakdown.py [--set model.num_layers=4 ...] [--top 12] [--out FILE]
    python experiments/temp_breakdown.py --target v5p:2x2x2      # the same step compiled for a TPU slice

`--target` compiles for a TPU slice with libtpu (no TPU needed, litejax.analysis.targets); XLA's report is then not
available, only memory_analysis() and litejax.analysis.train_temp's check. A program the TPU compiler refuses
(temporaries over HBM) is reported with the compiler's figure.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import harness
from litejax.env import set_cpu_device_count

SHRUNK = ['model.d_model=256', 'model.num_layers=2', 'model.num_heads=2', 'model.num_kv_heads=2',
          'model.vocab_size=512', 'moe.d_expert=64']


def parse_report(text: str, top: int) -> list[dict]:
  """The first `top` rows of XLA's memory-usage report: size in bytes and the values' shapes."""
  rows = []
  for line in text.splitlines():
    m = re.match(r'\s*[\d.]+[KMG]?i?B\(\s*\d+%\);\s*([\d.]+)([KMG]?i?B);\s*\d+;\s*(\d+);\s*(.*)$', line)
    if not m:
      continue
    scale = {'B': 1, 'KiB': 2 ** 10, 'MiB': 2 ** 20, 'GiB': 2 ** 30}[m.group(2)]
    rows.append({'bytes': int(float(m.group(1)) * scale), 'values': int(m.group(3)), 'shapes': m.group(4)})
    if len(rows) == top:
      break
  return rows


def main(argv=None) -> int:
  ap = harness.parser(__doc__, out='none')
  ap.add_argument('--set', nargs='*', default=[], help='config overrides on top of the shrunk quadrillion')
  ap.add_argument('--top', type=int, default=12)
  ap.add_argument('--out', default=None, help='write the JSON here too')
  ap.add_argument('--target', default=None, help='a TPU slice, e.g. v5p:2x2x2 (default: 8 CPU devices)')
  args = ap.parse_args(argv)
  if args.target:
    return _tpu(args)
  dump = tempfile.mkdtemp(prefix='temp_breakdown_')
  set_cpu_device_count(8)
  os.environ['XLA_FLAGS'] += (f' --xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*'
                              ' --xla_dump_hlo_pass_re=NONE')
  from litejax.analysis import bound as bound_report
  from litejax.train import sparse_step
  from litejax.config import load_config
  from litejax.model.layers import DTYPES
  import numpy as np

  cfg = load_config('configs/quadrillion.yaml', SHRUNK + args.set)
  prog = bound_report.compile_program(cfg, train=True, num_devices=8, global_batch=cfg.train.batch_size)
  mem = prog.compiled.memory_analysis()
  sizes = {'data': int(prog.mesh.shape['data']), 'expert': int(prog.mesh.shape['expert']), 'tensor': 1}
  rows = sparse_step.row_bounds(cfg, prog.tokens, sizes)['experts'] // (sizes['data'] * sizes['expert'])
  m = cfg.moe
  tables = 3 if m.expert_kind == 'glu' else 2
  touched = (cfg.model.num_moe_layers * rows * tables * cfg.model.d_model * m.d_expert
             * np.dtype(DTYPES[cfg.model.param_dtype]).itemsize)
  report = [f for f in os.listdir(dump) if f.endswith('memory-usage-report.txt')]
  out = {'overrides': SHRUNK + args.set, 'temp_bytes': int(mem.temp_size_in_bytes),
         'touched_expert_param_bytes': int(touched), 'touched_rows_per_layer': rows,
         'temp_over_touched': mem.temp_size_in_bytes / touched,
         'largest': parse_report(open(os.path.join(dump, sorted(report)[0])).read(), args.top) if report else []}
  return _emit(out, args.out)


def _emit(out: dict, path: str | None) -> int:
  """Prints the report as JSON and writes it to `path` when given."""
  text = json.dumps(out, indent=1)
  print(text)
  if path:
    with open(path, 'w') as f:
      f.write(text + '\n')
  return 0


def _tpu(args) -> int:
  from litejax.analysis import bound as bound_report, core, targets, train_temp
  from litejax.config import load_config

  cfg = load_config('configs/quadrillion.yaml', SHRUNK + args.set)
  c, mesh = targets.target_mesh(cfg, targets.resolve(args.target))
  out = {'overrides': SHRUNK + args.set, 'target': args.target}
  try:
    prog = bound_report.compile_program(c, train=True, mesh=mesh, global_batch=cfg.train.batch_size)
  except Exception as e:   # the TPU compiler's out-of-memory refusal names the temporaries it needed
    oom = core.parse_out_of_memory(str(e))
    if oom is None:
      raise
    out['refused'] = oom
  else:
    mem = core.memory_per_device(prog.compiled)
    out.update(temp_bytes=mem['temp'], memory=mem, **train_temp.temp_report(prog, mem))
  return _emit(out, args.out)


if __name__ == '__main__':
  sys.exit(main())
