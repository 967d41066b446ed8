"""TierSets (issue 13): the routing tiers a request may use, chosen to fit a per-token latency budget.

`store.placement` gives each routing tier a storage class. The candidate TierSets are hot only, hot +
warm, and all tiers (those allowing at least moe.k_tier tiers; duplicates dropped). For each:

* validation loss: a few val batches through the model with the tier mask (routing.route(tier_mask=...)
  in every MoE layer), and the fraction of tier selections that land in each storage class;
* predicted latency per decode step: the latency model's compute term for the decode step
  (litejax.analysis.decode_bound, the same for every TierSet) plus an I/O term. The store is laid out by placement
  (hot tiers' experts in device slots, warm ones in the host cache, cold ones on disk) and the I/O term
  charges every selection of a warm expert one host -> device copy and of a cold expert one disk read
  plus that copy, at the bandwidths `calibration.measure_level_bandwidth` measured. Reuse by the caches is
  not credited, so the term is an upper bound for a cold cache and pessimistic once the caches warm.

`choose` keeps the TierSets whose prediction fits the budget and picks the least validation loss;
`choose_for_budget` does all of it for `generate --store S --latency-budget-ms X`, and `preload` fills the
tiers by placement before that decode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from litejax.config import STORAGE_CLASSES, Config

CANDIDATES = (('hot', ('hot',)), ('hot+warm', ('hot', 'warm')), ('all', STORAGE_CLASSES))
# Evaluating TierSets holds every expert in memory; above this a store-only model is refused.
MAX_EVAL_EXPERT_BYTES = 2 * 2 ** 30


@dataclasses.dataclass(frozen=True)
class TierSet:
  name: str
  mask: tuple[bool, ...]    # [T]: the routing tiers allowed


def candidates(cfg: Config) -> list[TierSet]:
  """hot, hot+warm, all (each allowing >= moe.k_tier tiers; a set equal to a smaller one is dropped)."""
  classes = cfg.store.classes(cfg.moe.num_tiers)
  out, seen = [], set()
  for name, allowed in CANDIDATES:
    mask = tuple(c in allowed for c in classes)
    if sum(mask) >= cfg.moe.k_tier and mask not in seen:
      out.append(TierSet(name, mask))
      seen.add(mask)
  return out


def class_fractions(tokens_per_tier_t: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
  """Fraction of tier selections that fall in each storage class."""
  total = max(float(tokens_per_tier_t.sum()), 1.0)
  return {c: float(sum(n for n, k in zip(tokens_per_tier_t, classes) if k == c)) / total for c in STORAGE_CLASSES}


def io_ms_per_step(fractions: dict[str, float], assignments_per_step: float, expert_bytes: int,
                   io: dict[str, float]) -> float:
  """The I/O term (module docstring): a warm selection costs one host -> device slot load, a cold one a
  disk read and that load; hot ones nothing (resident in device slots). Each operation costs the larger
  of its measured per-expert time (`slot_load_s`, `disk_read_s`, calibration.measure_expert_ops) and the
  expert's bytes over the tier's bandwidth (`host_bytes_per_s`, `disk_bytes_per_s`,
  calibration.measure_level_bandwidth); either may be absent."""
  load = max(io.get('slot_load_s', 0.0), expert_bytes / io['host_bytes_per_s'])
  read = max(io.get('disk_read_s', 0.0), expert_bytes / io['disk_bytes_per_s'])
  warm, cold = assignments_per_step * fractions['warm'], assignments_per_step * fractions['cold']
  return 1e3 * (warm * load + cold * (read + load))


def evaluate(cfg: Config, model, tiersets: list[TierSet], batches: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
  """Per TierSet: mean validation cross-entropy over `batches` and the class fractions of its tier
  selections. One compiled eval program serves every TierSet (the mask is an argument)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from litejax.train.objective import forward_loss
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def eval_fn(params, extra, x_bs, y_bs, mask_t):
    ce, stats = forward_loss(graphdef, params, extra, x_bs, y_bs, mask_t)
    return ce, stats.tokens_per_tier.sum(0)

  classes = cfg.store.classes(cfg.moe.num_tiers)
  rows = []
  for ts in tiersets:
    mask = jnp.asarray(ts.mask, bool)
    got = [eval_fn(params, extra, x, y, mask) for x, y in batches]
    ces, tiers_t = zip(*jax.device_get(got))
    rows.append({'name': ts.name, 'tiers': [i for i, m in enumerate(ts.mask) if m],
                 'classes': sorted({classes[i] for i, m in enumerate(ts.mask) if m}, key=STORAGE_CLASSES.index),
                 'val_loss': float(np.mean(ces)),
                 'selection_fractions': class_fractions(np.sum(tiers_t, axis=0), classes)})
  return rows


def val_batches(cfg: Config, num_batches: int, batch_size: int, seq_len: int | None = None,
                data_path: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """The first `num_batches` val batches, drawn as `litejax train` draws its eval batches."""
  from litejax.train.data import TokenDataset
  seq_len = seq_len or cfg.model.seq_len
  ds = TokenDataset.from_path(data_path, val_fraction=cfg.train.val_fraction, seq_len=seq_len,
                              vocab_size=cfg.model.vocab_size)
  return [ds.batch(i, batch_size, seq_len, split='val', seed=cfg.train.seed) for i in range(num_batches)]


def predict(rows: list[dict], compute_ms: float, assignments_per_step: float, expert_bytes: int,
            bandwidth: dict[str, float]) -> list[dict]:
  """`rows` (from `evaluate`) with compute_ms, io_ms and predicted_ms_per_token added."""
  out = []
  for r in rows:
    io = io_ms_per_step(r['selection_fractions'], assignments_per_step, expert_bytes, bandwidth)
    out.append({**r, 'compute_ms': compute_ms, 'io_ms': io, 'predicted_ms_per_token': compute_ms + io})
  return out


def choose(rows: list[dict], budget_ms: float) -> dict:
  """The row that fits `budget_ms` with the least validation loss; ValueError naming the smallest
  predicted latency when none fits."""
  if not budget_ms > 0:
    raise ValueError(f'--latency-budget-ms: must be > 0, got {budget_ms}')
  fits = [r for r in rows if r['predicted_ms_per_token'] <= budget_ms]
  if not fits:
    best = min(rows, key=lambda r: r['predicted_ms_per_token'])
    raise ValueError(f"--latency-budget-ms: no TierSet fits {budget_ms:g} ms per token; the smallest predicted "
                     f"latency is {best['predicted_ms_per_token']:.3f} ms (TierSet {best['name']!r})")
  return min(fits, key=lambda r: (r['val_loss'], r['predicted_ms_per_token']))


def placement_fractions(cfg: Config) -> tuple[float, float]:
  """(device-slot fraction, host-cache fraction) of each layer's experts that hold the hot tiers in
  device slots and the hot + warm tiers in the host cache (expert ids are tier-major)."""
  classes = cfg.store.classes(cfg.moe.num_tiers)
  t = len(classes)
  hot, warm = classes.count('hot'), classes.count('warm')
  return hot / t, max(hot + warm, 1) / t


def tier_experts(cfg: Config, storage_class: str) -> list[int]:
  """The expert ids (per layer) of the routing tiers placed in `storage_class`."""
  m = cfg.moe
  per_tier = m.groups_per_tier * m.experts_per_group
  classes = cfg.store.classes(m.num_tiers)
  return [t * per_tier + e for t, c in enumerate(classes) if c == storage_class for e in range(per_tier)]


def with_store_experts(cfg: Config, model, store) -> Any:
  """`model` with every abstract routed-expert leaf filled from `store` (a store-only model, whose
  experts exist nowhere else). Refuses when the experts exceed MAX_EVAL_EXPERT_BYTES."""
  import jax
  from flax import nnx

  from litejax.inference.store import layout
  leaves = {'/'.join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model))}
  todo = [(l, n, leaf.removeprefix('params/'), i) for l, n, leaf, i in layout.expert_leaves(cfg)
          if isinstance(leaves[leaf.removeprefix('params/')].get_value(), jax.ShapeDtypeStruct)]
  if not todo:
    return model
  need = store.expert_bytes * store.num_experts * len(store.layers)
  if need > MAX_EVAL_EXPERT_BYTES:
    raise ValueError(f'--latency-budget-ms: evaluating TierSets holds every expert in memory ({need / 2 ** 30:.1f} '
                     f'GiB > {MAX_EVAL_EXPERT_BYTES / 2 ** 30:.0f} GiB); pass --ckpt-dir of a smaller trained model')
  stacked: dict[str, dict[int, np.ndarray]] = {}
  for layer, name, key, index in todo:
    w = store.read_experts(layer, range(store.num_experts))[name]
    if index is None:
      leaves[key].set_value(jax.numpy.asarray(w))
    else:
      stacked.setdefault(key, {})[index] = w
  for key, parts in stacked.items():
    leaves[key].set_value(jax.numpy.asarray(np.stack([parts[i] for i in range(len(parts))])))
  return model


def assignments_per_step(cfg: Config, batch: int) -> float:
  """Expert selections per decode step: batch x MoE layers x K."""
  return float(batch * cfg.model.num_moe_layers * cfg.moe.k_active)


# ---------------------------------------------------------------------------- generate --latency-budget-ms

def choose_for_budget(cfg: Config, model, store, opts, *, batch: int, cache_len: int, budget_ms: float,
                      num_val_batches: int, io_probes: Callable[[], dict[str, float]], chip,
                      programs: dict | None = None) -> tuple[dict, Any]:
  """The TierSet to decode `batch` sequences of up to `cache_len` tokens with, under `budget_ms` per token:
  every candidate's validation loss over `num_val_batches` val batches (`evaluate`), its predicted latency
  (`predict`: the compute term of the tiered step as it will run, `compute_term`, plus the I/O term at the
  rates `io_probes()` returns, e.g. calibration.measure_level_bandwidth's; priced on `chip`, a
  litejax.perf.chips.Chip such as litejax.perf.host.measure_host's), and the one `choose` picks.

  Returns (the choice: budget, chosen name, tier mask, predicted latency, every considered row, the
  compute and I/O figures, the placement's fractions; `opts` with device slots and host cache sized by
  `placement_fractions`). programs: the store runtime's programs to record the step with (the ones the
  decode will run: they then compile once). ValueError for a bad argument or when no TierSet fits."""
  if num_val_batches < 1:
    raise ValueError(f'--val-batches: must be >= 1, got {num_val_batches}')
  if not budget_ms > 0:
    raise ValueError(f'--latency-budget-ms: must be > 0, got {budget_ms}')
  sets = candidates(cfg)
  model = with_store_experts(cfg, model, store)
  rows = evaluate(cfg, model, sets, val_batches(cfg, num_val_batches, cfg.train.batch_size))
  bandwidth = io_probes()
  device, host = placement_fractions(cfg)
  opts = dataclasses.replace(opts, device_slots=device, host_cache=host)
  compute = compute_term(cfg, model, store, opts, batch, cache_len, sets[0].mask, chip, programs)
  rows = predict(rows, compute['compute_ms'], assignments_per_step(cfg, batch), store.expert_bytes, bandwidth)
  best = choose(rows, budget_ms)
  mask = next(ts.mask for ts in sets if ts.name == best['name'])
  return {'budget_ms': budget_ms, 'chosen': best['name'], 'mask': mask,
          'predicted_ms_per_token': best['predicted_ms_per_token'], 'considered': rows,
          'compute': compute, 'io_probes': bandwidth, 'device_slots': device, 'host_cache': host}, opts


def compute_term(cfg: Config, model, store, opts, batch: int, cache_len: int, hot_mask, chip,
                 programs: dict | None = None) -> dict:
  """The latency model's compute part of one step of the store runtime that will decode
  (litejax.inference.step_latency: its programs as run, and the host time of a step), the same for every
  TierSet (the tier mask is an argument of the same programs). Recorded with the hot TierSet and its
  experts preloaded, so that the step does no I/O (the I/O term is priced apart); priced on `chip`."""
  from litejax.inference import step_latency
  from litejax.inference.store.levels import ExpertLevels
  from litejax.inference.store_decode import StoreRuntime
  levels = ExpertLevels(store, opts, load_width=cfg.moe.k_active * batch)
  try:
    preload(cfg, levels)
    rt = StoreRuntime(cfg, model, levels, hot_mask, programs=programs)
    rec = step_latency.record_step(rt, [[0] * max(cache_len - 7, 1)] * batch)
  finally:
    levels.close()
  return step_latency.price(rec, chip)


def preload(cfg: Config, tiers) -> None:
  """Hot tiers' experts into device slots, warm ones into the host cache, for every MoE layer."""
  hot, warm = tier_experts(cfg, 'hot'), tier_experts(cfg, 'warm')
  for layer in tiers.store.layers:
    tiers.preload(layer, hot, warm)


def report(choice: dict, measured_ms: float | None) -> dict:
  """The `tierset` JSON of `generate --latency-budget-ms`: `choose_for_budget`'s choice without its mask,
  the chosen tiers, and the prediction against `measured_ms` per token."""
  out = {k: v for k, v in choice.items() if k != 'mask'}
  out['tiers'] = [i for i, m in enumerate(choice['mask']) if m]
  out['measured_ms_per_token'] = measured_ms
  out['predicted_over_measured'] = (choice['predicted_ms_per_token'] / measured_ms) if measured_ms else None
  return out
