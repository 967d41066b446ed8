"""The search for the smallest TPU slice on which a config's step fits (`litejax plan`).

For each slice shape of the generation, smallest first (litejax.hardware.SLICES): lay the config's
mesh rules over its chips; count the per-chip bytes of parameters and optimizer state from the
sharding rules (no compile: a slice whose state alone overflows HBM is ruled out at once); otherwise
compile the step for that topology (libtpu, no TPU needed) and take memory_analysis()'s arguments +
outputs + temporaries (activations included) against the chip's HBM. The first slice that fits is
the answer. When none fits, the result says by how much the largest slice misses and how many chips
the state alone would need.
"""
from __future__ import annotations

import math

from litejax.config import ConfigError
from litejax.footprint import state_bytes_per_device


def smallest_slice(cfg, generation: str, *, train: bool = True, global_batch: int | None = None,
                   log=lambda s: None) -> dict:
  """Search the generation's slices, smallest first; returns the answer and every slice's verdict."""
  from litejax import cost, hardware, sharding, targets
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
      state = state_bytes_per_device(cfg, sizes, train)
    except ConfigError as e:
      tried.append({**row, 'verdict': 'mesh does not divide', 'reason': str(e)})
      log(f'{spec:16s} skipped: {e}')
      continue
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
