"""`litejax generate --store S --latency-budget-ms X`: choose the TierSet (litejax.inference.tiersets) before decoding,
size and fill the tiers by `store.placement`, and report predicted against measured latency."""
from __future__ import annotations

import dataclasses


def _compute(cfg, model, store, opts, batch: int, cache_len: int, hot_mask, chip) -> dict:
  """The latency model's compute part of one step of the store runtime that will decode
  (litejax.inference.step_latency: its programs as run, and the host time of a step), the same for every TierSet
  (the tier mask is an argument of the same programs). Recorded with the hot TierSet and its experts
  preloaded, so that the step does no I/O (the I/O term is priced apart); priced on `chip`."""
  from litejax.inference import step_latency as step_cost
  from litejax.inference.store.levels import ExpertLevels
  from litejax.inference.store_decode import StoreRuntime
  tiers = ExpertLevels(store, opts, load_width=cfg.moe.k_active * batch)
  try:
    preload(cfg, tiers)
    rec = step_cost.record_step(StoreRuntime(cfg, model, tiers, hot_mask), [[0] * max(cache_len - 7, 1)] * batch)
  finally:
    tiers.close()
  return step_cost.price(rec, chip)


def choose(args, cfg, model, store, opts, batch: int, cache_len: int, chip=None):
  """(the chosen TierSet's row with every considered row, the LevelOptions sized by placement), the
  compute part priced on `chip` (default: this host, measured now: litejax.perf.host.measure_host).
  ValueError for a bad flag or when no TierSet fits."""
  from litejax.calibrate import calibration
  from litejax.inference import tiersets
  if args.val_batches < 1:
    raise ValueError(f'--val-batches: must be >= 1, got {args.val_batches}')
  if not args.latency_budget_ms > 0:
    raise ValueError(f'--latency-budget-ms: must be > 0, got {args.latency_budget_ms}')
  sets = tiersets.candidates(cfg)
  model = tiersets.with_store_experts(cfg, model, store)
  batches = tiersets.val_batches(cfg, args.val_batches, cfg.train.batch_size)
  rows = tiersets.evaluate(cfg, model, sets, batches)
  bandwidth = {**calibration.measure_level_bandwidth(directory=_store_dir(args.store)),
               **calibration.measure_expert_ops(store)}
  device, host = tiersets.placement_fractions(cfg)
  opts = dataclasses.replace(opts, device_slots=device, host_cache=host)
  if chip is None:
    from litejax.perf.host import measure_host
    chip = measure_host(repeats=3)
  compute = _compute(cfg, model, store, opts, batch, cache_len, sets[0].mask, chip)
  rows = tiersets.predict(rows, compute['compute_ms'], tiersets.assignments_per_step(cfg, batch),
                          store.expert_bytes, bandwidth)
  best = tiersets.choose(rows, args.latency_budget_ms)
  mask = next(ts.mask for ts in sets if ts.name == best['name'])
  return {'budget_ms': args.latency_budget_ms, 'chosen': best['name'], 'mask': mask,
          'predicted_ms_per_token': best['predicted_ms_per_token'], 'considered': rows,
          'compute': compute, 'io_probes': bandwidth, 'device_slots': device, 'host_cache': host}, opts


def _store_dir(location: str) -> str | None:
  """The local folder of a store (the disk probe's file goes there); None for a remote one."""
  import pathlib
  path = pathlib.Path(location.removeprefix('file://'))
  return str(path) if path.is_dir() else None


def preload(cfg, tiers) -> None:
  """Hot tiers' experts into device slots, warm ones into the host cache, for every MoE layer."""
  from litejax.inference import tiersets
  hot, warm = tiersets.tier_experts(cfg, 'hot'), tiersets.tier_experts(cfg, 'warm')
  for layer in tiers.store.layers:
    tiers.preload(layer, hot, warm)


def report(tierset: dict, measured_ms: float | None) -> dict:
  """The `tierset` JSON: the budget, the chosen TierSet, predicted vs measured, every considered one."""
  out = {k: v for k, v in tierset.items() if k != 'mask'}
  out['tiers'] = [i for i, m in enumerate(tierset['mask']) if m]
  out['measured_ms_per_token'] = measured_ms
  out['predicted_over_measured'] = (tierset['predicted_ms_per_token'] / measured_ms) if measured_ms else None
  return out
