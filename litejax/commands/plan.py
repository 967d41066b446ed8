"""`litejax plan`: the smallest slice of a TPU generation on which a config's training step fits.

For each slice shape of the generation, smallest first (litejax.hardware.SLICES): lay the config's
mesh rules over its chips; count the per-chip bytes of parameters and optimizer state from the
sharding rules (no compile: a slice whose state alone overflows HBM is ruled out at once); otherwise
compile the step for that topology (libtpu, no TPU needed) and take memory_analysis()'s arguments +
outputs + temporaries (activations included) against the chip's HBM. The first slice that fits is
the answer, printed with its per-chip report and the latency model's step time. When none fits, the
report says by how much the largest slice misses and how many chips the state alone would need.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from litejax.cli import add_config_arguments, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser)
  parser.add_argument('--generation', default='v5p', help='TPU generation: v5p, v5e, v6e or v4 (default v5p)')
  parser.add_argument('--forward', action='store_true',
                      help='plan a forward pass (parameters only), not a training step')
  parser.add_argument('--batch', type=positive_int, default=None,
                      help='global batch (default: one sequence per batch rank of each slice)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def state_bytes_per_device(cfg, sizes: dict[str, int], train: bool) -> dict[str, float]:
  """Bytes of parameters (and, training, AdamW's two moments) one device holds under the mesh rules.

  From the abstract model's parameter shapes and logical axes: each dimension is split over the
  product of its mesh axes (rounded up). AdamW's mu and nu mirror every parameter in its dtype and
  sharding (litejax.sharding.tree_shardings_like), hence 2× the parameter bytes.
  """
  import jax
  import numpy as np
  from flax import nnx

  from litejax import sharding
  from litejax.model import abstract_model
  params = 0.0
  total = 0.0
  for var in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    sds = var.get_value()
    nbytes = np.dtype(sds.dtype).itemsize
    axes = var.get_metadata().get('logical_axes')
    spec = sharding.logical_to_spec(axes, len(sds.shape)) if axes is not None else ()
    shard = list(sds.shape)
    for i, mesh_axes in enumerate(spec):
      if mesh_axes is None:
        continue
      names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      shard[i] = math.ceil(shard[i] / math.prod(sizes[n] for n in names))
    params += math.prod(shard) * nbytes
    total += math.prod(sds.shape) * nbytes
  factor = 3 if train else 1
  return {'params': params, 'optimizer': params * (factor - 1), 'state': params * factor,
          'state_total_all_chips': total * factor}


def plan(cfg, generation: str, *, train: bool = True, global_batch: int | None = None,
         log=lambda s: None) -> dict:
  """Search the generation's slices, smallest first; returns the answer and every slice's verdict."""
  from litejax import cost, hardware, sharding, targets
  from litejax.config import ConfigError
  chip = hardware.chip(generation)
  tried = []
  answer = None
  state = None
  for topo in hardware.SLICES[generation]:
    spec = f'{generation}:{topo}'
    chips = math.prod(int(x) for x in topo.split('x'))
    devices = chips * chip.devices_per_chip
    row = {'target': spec, 'chips': chips}
    try:
      sizes = dict(zip(sharding.AXES, sharding._resolve_sizes(cfg.mesh, devices)))
      sharding._validate_model(cfg, sizes)
      if global_batch and global_batch % (sizes['data'] * sizes['expert']):
        raise ConfigError(f'batch {global_batch} is not divisible by data*expert = '
                          f'{sizes["data"] * sizes["expert"]}')
    except ConfigError as e:
      tried.append({**row, 'verdict': 'mesh does not divide', 'reason': str(e)})
      log(f'{spec:16s} skipped: {e}')
      continue
    state = state_bytes_per_device(cfg, sizes, train)
    need = state['state'] * chip.devices_per_chip
    row.update(mesh=sizes, state_bytes_per_chip=need)
    if need > chip.hbm_bytes:
      tried.append({**row, **targets.verdict(need, chip.hbm_bytes), 'by': 'parameters+optimizer state alone'})
      log(f'{spec:16s} does not fit: state alone {need / chip.hbm_bytes:.3g}x HBM')
      continue
    target = targets.resolve(spec)
    c, mesh = targets.target_mesh(cfg, target)
    prog = cost.compile_program(c, train=train, mesh=mesh, global_batch=global_batch)
    rep = targets.per_chip_report(prog, target)
    tried.append({**row, **rep['fit'], 'by': 'memory_analysis'})
    log(f"{spec:16s} {rep['fit']['verdict']}: {rep['fit']['need_over_hbm']:.3g}x HBM (compiled)")
    if rep['fit']['fits']:
      answer = rep
      break
  out = {'generation': generation, 'train': train, 'chip': chip.as_dict(), 'tried': tried,
         'answer': answer['target'] if answer else None, 'per_chip': answer}
  if answer is None and state is not None:
    total = state['state_total_all_chips']
    last = tried[-1]
    out['shortfall'] = {
        'largest_slice': last['target'],
        'need_over_hbm_on_largest_slice': last.get('need_over_hbm'),
        'state_bytes_total': total,
        'pod_hbm_bytes': chip.max_chips * chip.hbm_bytes,
        'state_over_pod_hbm': total / (chip.max_chips * chip.hbm_bytes),
        'chips_needed_if_fully_sharded': math.ceil(total / chip.hbm_bytes),
        'pods_needed_if_fully_sharded': total / (chip.max_chips * chip.hbm_bytes),
    }
  return out


def run(args: argparse.Namespace) -> int:
  from litejax import hardware, targets
  from litejax.config import load_config
  cfg = load_config(args.config, args.overrides)
  try:
    hardware.chip(args.generation)
  except ValueError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  from litejax import bounds
  h = bounds.human
  try:
    out = plan(cfg, args.generation, train=not args.forward, global_batch=args.batch,
               log=(lambda s: None) if args.json else (lambda s: print('  ' + s, flush=True)))
  except targets.TargetError as e:
    print(f'litejax plan: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(out, indent=2, default=float))
    return 0 if out['answer'] else 1
  what = 'forward (parameters)' if args.forward else 'training step (parameters + AdamW state + activations)'
  chip = out['chip']
  if out['answer']:
    print(f"plan: {out['answer']} is the smallest {args.generation} slice where the {what} fits "
          f"({h(chip['hbm_bytes'])}B HBM per chip)")
    print('\n'.join(targets.format_per_chip(out['per_chip'], h)))
    return 0
  s = out.get('shortfall')
  print(f'plan: the {what} fits on no {args.generation} slice')
  if s:
    print(f"  largest slice {s['largest_slice']}: needs {s['need_over_hbm_on_largest_slice']:.3g}x a chip's HBM "
          f"with this config's mesh rules")
    print(f"  state in all: {h(s['state_bytes_total'])}B vs {h(s['pod_hbm_bytes'])}B of HBM in a whole pod "
          f"({s['state_over_pod_hbm']:.3g}x): even sharded perfectly it needs {s['chips_needed_if_fully_sharded']:,} "
          f"chips ({s['pods_needed_if_fully_sharded']:.3g} pods)")
    print('  to fit, most experts must live off-HBM: cold tiers in host memory or storage, fetched on '
          'demand (SPEC-006 I/O term), with only hot tiers resident')
  return 1
