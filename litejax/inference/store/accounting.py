"""The `store` JSON's rates from the storage levels' counters (litejax.inference.store.levels.LevelCounters), in
plain Python: hit rates per level and per layer, and what a step's prefetches predicted against what its
layers used (lookahead recall per depth, wasted prefetch reads), for router lookahead and a pre-gated
model's exact prefetch.

A layer may look its experts up in several waves (more distinct experts than slots, e.g. a prefill), so
the prediction ledger waits for the end of the step (`settle`), when everything the layer used is known.
"""
from __future__ import annotations

LEVEL_FIELDS = ('lookups', 'device_hits', 'host_hits', 'disk_demand', 'prefetch_waits', 'fallbacks')


def hit_rates(c, since=None) -> dict[str, float]:
  """Fractions of the lookups counted in `c` (after `since`, earlier counters, when given) found at each level:
  device, host, disk (on demand, or waiting for a prefetch read in flight), fallback (the int8 copy). Each
  lookup counts at one level, so they sum to 1."""
  d = {k: getattr(c, k) - (getattr(since, k) if since is not None else 0) for k in LEVEL_FIELDS}
  n = max(d['lookups'], 1)
  return {'device': d['device_hits'] / n, 'host': d['host_hits'] / n,
          'disk': (d['disk_demand'] + d['prefetch_waits']) / n, 'fallback': d['fallbacks'] / n}


def device_hit_rate_per_layer(c, since=None) -> dict[int, float | None]:
  """{MoE layer: the fraction of its lookups (after `since`) found in a device slot}, from c.layer_hits."""
  before = since.layer_hits if since is not None else {}
  out = {}
  for layer, (n, hits) in sorted(c.layer_hits.items()):
    n0, h0 = before.get(layer, (0, 0))
    out[layer] = (hits - h0) / (n - n0) if n > n0 else None
  return out


class PredictionLedger:
  """One step's predictions per (layer, depth), prefetch disk reads per layer and experts used per layer."""

  def __init__(self):
    self.predicted: dict[tuple[int, int], set[int]] = {}   # (target layer, depth) -> experts
    self.read: dict[int, set[int]] = {}                     # target layer -> experts its prefetches read from disk
    self.used: dict[int, set[int]] = {}                     # layer -> experts its lookups asked for

  def settle(self, counters) -> None:
    """Adds the step to `counters` (a LevelCounters: recall_hit / recall_total per depth, prefetch_wasted):
    recall at depth d = |predicted d layers ahead ∩ used| / |used| over the layers that had a prediction;
    wasted = prefetch reads of experts the layer did not use in the step. Then starts the next step."""
    for layer, used in self.used.items():
      counters.prefetch_wasted += len(self.read.get(layer, set()).difference(used))
      for depth in range(1, len(counters.recall_hit) + 1):
        pred = self.predicted.get((layer, depth))
        if pred is not None:
          counters.recall_hit[depth - 1] += len(pred.intersection(used))
          counters.recall_total[depth - 1] += len(used)
    self.predicted, self.read, self.used = {}, {}, {}
