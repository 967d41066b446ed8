"""What a step's prefetches predicted against what its layers used (plain Python): the `store` JSON's lookahead
recall per depth and its wasted prefetch reads, for router lookahead and a pre-gated model's exact prefetch.

A layer may look its experts up in several waves (more distinct experts than slots, e.g. a prefill), so
the comparison waits for the end of the step (`settle`), when everything the layer used is known.
"""
from __future__ import annotations


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
