"""The search for the smallest TPU slice on which a config's step fits (`litejax plan`).

For each slice shape of the generation, smallest first (litejax.perf.chips.SLICES): lay the config's
mesh rules over its chips; count the per-chip bytes of parameters and optimizer state from the
sharding rules (no compile: a slice whose state alone overflows HBM is ruled out at once); otherwise
compile the step for that topology (libtpu, no TPU needed) and take memory_analysis()'s arguments +
outputs + temporaries (activations included) against the chip's HBM. The first slice that fits is
the answer. When none fits, the result says by how much the largest slice misses and how many chips
the state alone would need.

Serving (`serve_plan`, `litejax plan --serve`) is arithmetic alone; its I/O term prices the hit rates it is
given, e.g. those a tiers benchmark measured (`read_hit_rates`, `--hit-rates PATH`).
"""
from __future__ import annotations

import json
import math
import pathlib

from litejax import units
from litejax.config import ConfigError, InputError
from litejax.analysis.footprint import state_bytes_per_device


def smallest_slice(cfg, generation: str, *, train: bool = True, global_batch: int | None = None,
                   log=lambda s: None) -> dict:
  """Search the generation's slices, smallest first; returns the answer and every slice's verdict."""
  from litejax.analysis import bound as bound_report
  from litejax.perf import chips as hardware
  from litejax import sharding
  from litejax.analysis import core, per_chip, targets
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
      sizes = dict(zip(sharding.AXES, sharding.resolve_sizes(cfg.mesh, devices)))
      sharding.validate_model(cfg, sizes)
      if global_batch and global_batch % (sizes['data'] * sizes['expert']):
        raise ConfigError(f'batch {global_batch} is not divisible by data*expert = '
                          f'{sizes["data"] * sizes["expert"]}')
      state, state_sizes = state_bytes_per_device(cfg, sizes, train), sizes
    except ConfigError as e:
      tried.append({**row, 'verdict': 'mesh does not divide', 'reason': str(e)})
      log(f'{spec:16s} skipped: {e}')
      continue
    need = state['state'] * chip.devices_per_chip
    row.update(mesh=sizes, state_bytes_per_chip=need,
               state_by_table_per_chip={k: v * chip.devices_per_chip for k, v in state['state_by_table'].items()})
    if need > chip.hbm_bytes:
      tried.append({**row, **per_chip.fit_verdict(need, chip.hbm_bytes), 'by': 'parameters+optimizer state alone'})
      log(f'{spec:16s} does not fit: state alone {need / chip.hbm_bytes:.3g}x HBM')
      continue
    target = targets.resolve(spec)
    c, mesh = targets.target_mesh(cfg, target)
    prog, refused = core.compile_or_refusal(
        lambda: bound_report.compile_program(c, train=train, mesh=mesh, global_batch=global_batch))
    if refused is not None:   # the TPU compiler's own verdict: the step's buffers exceed a device's HBM
      tried.append({**row, **per_chip.fit_verdict(refused['required_bytes'], refused['available_bytes']),
                    'by': 'compiler refused', 'compiler_refused': refused['message']})
      log(f"{spec:16s} does not fit: the compiler refused it ({refused['message']})")
      continue
    rep = per_chip.per_chip_report(prog, target)
    tried.append({**row, **rep['fit'], 'by': 'memory_analysis'})
    log(f"{spec:16s} {rep['fit']['verdict']}: {rep['fit']['need_over_hbm']:.3g}x HBM (compiled)")
    if rep['fit']['fits']:
      answer = rep
      break
  out = {'generation': generation, 'train': train, 'chip': chip.as_dict(), 'tried': tried,
         'answer': answer['target'] if answer else None, 'per_chip': answer}
  if state is not None and train:
    out['train_state'] = {k: state[k] for k in ('expert_update', 'expert_optimizer', 'params_total_all_chips',
                                                 'optimizer_total_all_chips', 'state_total_all_chips')}
    out['train_state_options'] = state_options(cfg, state_sizes, generation,
                                               chosen=(state['expert_update'], state['expert_optimizer']))
  if answer is None and state is not None:
    total = state['state_total_all_chips']
    # the largest slice whose mesh divides the config (a larger one that does not divide is no option)
    counted = [r for r in tried if 'need_over_hbm' in r]
    last, least = counted[-1], min(reversed(counted), key=lambda r: r['need_over_hbm'])   # ties: the larger
    out['shortfall'] = {
        'largest_slice': last['target'],
        'need_over_hbm_on_largest_slice': last['need_over_hbm'],
        'state_bytes_per_chip_on_largest_slice': last['state_bytes_per_chip'],
        'state_by_table_per_chip_on_largest_slice': last['state_by_table_per_chip'],
        'least_short_slice': least['target'],
        'need_over_hbm_on_least_short_slice': least['need_over_hbm'],
        'state_by_table_per_chip_on_least_short_slice': least['state_by_table_per_chip'],
        'slices_whose_mesh_does_not_divide': [r['target'] for r in tried if r['verdict'] == 'mesh does not divide'],
        'state_bytes_total': total,
        'pod_hbm_bytes': chip.max_chips * chip.hbm_bytes,
        'state_over_pod_hbm': total / (chip.max_chips * chip.hbm_bytes),
        'chips_needed_if_fully_sharded': math.ceil(total / chip.hbm_bytes),
        'pods_needed_if_fully_sharded': total / (chip.max_chips * chip.hbm_bytes),
    }
    if generation in hardware.SERVE_HOST:
      out['shortfall']['host_tier'] = host_tier(total, generation)
  return out


# (train.expert_update, train.expert_optimizer) pairs a config can train with (factored is sparse-only).
OPTIMIZER_CHOICES = (('dense', 'adamw'), ('sparse', 'adamw'), ('sparse', 'factored'))


def state_options(cfg, sizes: dict[str, int], generation: str, chosen: tuple[str, str] = ('', '')) -> list[dict]:
  """The training state's total bytes under each expert update / optimizer choice, beside a whole pod's
  HBM: the whole train state (litejax.analysis.footprint) and the experts' share by arithmetic
  (`sparse_optim.expert_state_bytes`: bf16-or-f32 parameters + f32 row state per expert; the dense
  update's optax moments mirror the parameter dtype). `chosen` marks the config's own choice."""
  import dataclasses

  from litejax.model import bounds
  from litejax.perf import chips as hardware
  from litejax.train import row_optim
  chip = hardware.chip(generation)
  pod = chip.max_chips * chip.hbm_bytes
  m, mc = cfg.moe, cfg.model
  pbytes = units.dtype_bytes(mc.param_dtype)
  experts = mc.num_moe_layers * m.experts_total
  out = []
  for update, opt in OPTIMIZER_CHOICES:
    c = cfg.replace(train=dataclasses.replace(cfg.train, expert_update=update, expert_optimizer=opt))
    total = state_bytes_per_device(c, sizes, True)['state_total_all_chips']
    if update == 'dense':
      expert_state = 3 * pbytes * bounds.param_counts(cfg).expert_total
    else:
      expert_state = experts * row_optim.expert_state_bytes(mc.d_model, m.d_expert, opt, m.expert_kind == 'glu',
                                                               param_bytes=pbytes)
    out.append({'expert_update': update, 'expert_optimizer': opt, 'state_bytes_total': total,
                'expert_state_bytes_total': expert_state, 'state_over_pod_hbm': total / pod,
                'bytes_per_chip_on_pod_if_fully_sharded': total / chip.max_chips,
                'chips_needed_if_fully_sharded': math.ceil(total / chip.hbm_bytes),
                'chosen': (update, opt) == tuple(chosen)})
  return out


def host_tier(state_total: float, generation: str) -> dict:
  """The next tier when HBM is short: a whole pod's HBM holds what it can (perfectly sharded), host RAM
  (hardware.SERVE_HOST, per chip, with its source) must hold the rest. Activations are not counted."""
  from litejax.perf import chips as hardware
  chip, host = hardware.chip(generation), hardware.SERVE_HOST[generation]
  pod_hbm = chip.max_chips * chip.hbm_bytes
  rest = max(0.0, state_total - pod_hbm)
  per_chip_both = chip.hbm_bytes + host['host_ram_bytes']
  return {'host_must_hold_bytes': rest, 'host_must_hold_bytes_per_chip': rest / chip.max_chips,
          'host_ram_bytes_per_chip': host['host_ram_bytes'], 'host_ram_source': host['host_ram_source'],
          'need_over_host_ram': rest / chip.max_chips / host['host_ram_bytes'],
          'pod_hbm_plus_host_bytes': chip.max_chips * per_chip_both,
          'state_over_pod_hbm_plus_host': state_total / (chip.max_chips * per_chip_both),
          'chips_needed_hbm_plus_host': math.ceil(state_total / per_chip_both)}


def serve_plan(cfg, generation: str, *, device_fraction: float = 0.01, host_fraction: float = 0.1,
               batch: int = 1, hit_rates: dict | None = None) -> dict:
  """Serving with the tiered expert store, by arithmetic (no compile): per chip, HBM holds the non-expert
  weights (sharded over the slice), its share of the device slots (`device_fraction` of every layer's
  experts) and of the KV cache (`batch` sequences of seq_len); host RAM holds its share of the host cache
  (`host_fraction` of the experts); disk holds every expert. The smallest slice of `generation` where both
  fit is the answer. Per-token latency at batch 1: the active weights read once from HBM (the memory
  roofline, at one chip's bandwidth), plus the I/O term -- each token's K experts per layer that miss the device slots cross
  host -> HBM, and those that also miss the host cache are read from disk first -- at `hit_rates`
  ({'device': ..., 'device_or_host': ...}, e.g. the benchmark's measured ones). A pre-gated model
  (moe.pregate = D) fetches a layer's experts from the time the MoE layer D earlier runs, so its I/O
  overlaps the compute of the layers in between; the I/O term is then what does not fit under that
  compute (`exposed_io_s`)."""
  from litejax.model import bounds
  from litejax.perf import chips as hardware
  chip = hardware.chip(generation)
  if generation not in hardware.SERVE_HOST:
    raise ValueError(f'--generation: serving needs host RAM per chip, known for {sorted(hardware.SERVE_HOST)}')
  host = hardware.SERVE_HOST[generation]
  m, mm = cfg.model, cfg.moe
  wbytes = units.dtype_bytes(m.param_dtype)
  p = bounds.param_counts(cfg)
  expert_bytes = p.expert_total * wbytes
  non_expert = (p.total - p.expert_total) * wbytes
  kv = m.num_layers * batch * m.seq_len * bounds.kv_cache_values_per_token(m) * wbytes
  device_total = non_expert + device_fraction * expert_bytes + kv
  host_total = host_fraction * expert_bytes
  tried, answer = [], None
  for topo in hardware.SLICES[generation]:
    chips = math.prod(int(x) for x in topo.split('x'))
    hbm, ram = device_total / chips, host_total / chips
    row = {'target': f'{generation}:{topo}', 'chips': chips, 'hbm_bytes_per_chip': hbm,
           'host_bytes_per_chip': ram, 'hbm_fits': hbm <= chip.hbm_bytes, 'host_fits': ram <= host['host_ram_bytes']}
    tried.append(row)
    if row['hbm_fits'] and row['host_fits']:
      answer = row
      break
  hr = hit_rates or {}
  one_expert = p.expert_active_per_token * wbytes / max(mm.k_active * bounds_moe_layers(cfg), 1)
  lookups = mm.k_active * bounds_moe_layers(cfg)
  out = {'generation': generation, 'device_fraction': device_fraction, 'host_fraction': host_fraction,
         'batch': batch, 'bytes': {'experts': expert_bytes, 'non_expert': non_expert, 'kv_cache': kv,
                                   'device_total': device_total, 'host_total': host_total,
                                   'disk_total': expert_bytes},
         'host': host, 'chip_hbm_bytes': chip.hbm_bytes, 'tried': tried,
         'answer': answer['target'] if answer else None, 'per_chip': answer}
  if answer is None:
    last = tried[-1]
    out['why_none'] = (f"the largest slice {last['target']} needs {last['hbm_bytes_per_chip'] / chip.hbm_bytes:.3g}x "
                       f"a chip's HBM and {last['host_bytes_per_chip'] / host['host_ram_bytes']:.3g}x its host RAM")
  if 'device' in hr and 'device_or_host' in hr:
    # one chip's HBM bandwidth for all active weights: batch 1 gains little from spreading a token's layers
    compute_s = p.active_per_token * wbytes / chip.hbm_bytes_per_s
    host_s = (1 - hr['device']) * lookups * one_expert / host['host_to_hbm_bytes_per_s']
    disk_s = (1 - hr['device_or_host']) * lookups * one_expert / host['disk_bytes_per_s']
    out['latency'] = {'hit_rates': hr, 'expert_bytes': one_expert, 'expert_lookups_per_token': lookups,
                      'compute_ms': 1e3 * compute_s, 'io_host_to_hbm_ms': 1e3 * host_s, 'io_disk_ms': 1e3 * disk_s,
                      'per_token_ms': 1e3 * (compute_s + host_s + disk_s)}
    if mm.pregate:
      exposed_s = exposed_io_s(cfg, compute_s, host_s + disk_s)
      out['latency'].update(pregate=mm.pregate, io_exposed_ms=1e3 * exposed_s,
                            io_overlapped_ms=1e3 * (host_s + disk_s - exposed_s), per_token_ms=1e3 * (compute_s + exposed_s))
  return out


def exposed_io_s(cfg, compute_s: float, io_s: float) -> float:
  """The part of a token's I/O (io_s, spread evenly over its MoE layers) that a pre-gated model
  (moe.pregate = D) cannot hide under compute (compute_s, spread evenly over its layers), by a schedule of
  one token: one I/O link serving reads in the order they are issued; MoE layer j's experts are known when
  MoE layer j - D starts (the first D: when they start themselves) and its reads are issued then; a layer
  starts once the layer before it is done and its own reads have arrived. D = 0 exposes all of io_s."""
  mc, depth = cfg.model, cfg.moe.pregate
  moe_index = [i for i in range(mc.num_layers) if mc.is_moe_layer(i)]
  if not moe_index:
    return 0.0
  per_layer_s, io_layer_s = compute_s / mc.num_layers, io_s / len(moe_index)
  t = link = 0.0
  arrive: dict[int, float] = {}
  for i in range(mc.num_layers):
    if mc.is_moe_layer(i):
      j = moe_index.index(i)
      issued = [j] if depth == 0 or j < depth else []       # read on demand when its own router has run
      issued += [j + depth] if depth and j + depth < len(moe_index) else []   # the layer D ahead, known now
      for target in issued:
        link = max(link, t) + io_layer_s
        arrive[target] = link
      t = max(t, arrive[j])
    t += per_layer_s
  return t - mc.num_layers * per_layer_s


def read_hit_rates(path: str | pathlib.Path, device_fraction: float = 0.01, policy: str = 'lru') -> dict:
  """The hit rates `serve_plan` prices with, from a tiers benchmark JSON (experiments/bench_tiers.py writes
  one: trace-replay rows per policy and device-slot fraction): {'device', 'device_or_host', 'source'} of the
  `policy` row at `device_fraction`. InputError naming --hit-rates for a file that is not such a JSON."""
  where = f'--hit-rates {path}'
  try:
    bench = json.loads(pathlib.Path(path).read_text())
    rows = [r for r in bench['sim'] if r['policy'] == policy and r['device_fraction'] == device_fraction]
  except FileNotFoundError:
    raise InputError(f'{where}: no such file') from None
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise InputError(f'{where}: not a tiers benchmark JSON (experiments/bench_tiers.py): {type(e).__name__}: {e}') \
        from None
  if not rows:
    raise InputError(f'{where}: no {policy} row at {device_fraction:.0%} device slots in its "sim" rows')
  host = bench.get('host_cache_fraction')
  return {'device': rows[0]['device_hit_rate'], 'device_or_host': rows[0]['hit_rate_device_or_host'],
          'source': f"{path} ({policy}, {device_fraction:.0%} device slots, "
                    + (f'{host:.0%} host cache, ' if isinstance(host, (int, float)) else '')
                    + f"decode trace of {bench.get('config', 'an unnamed config')})"}


def bounds_moe_layers(cfg) -> int:
  """MoE layers of the config (every moe_every-th)."""
  from litejax.inference.store import layout
  return len(layout.moe_layers(cfg))
