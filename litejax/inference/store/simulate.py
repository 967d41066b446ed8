"""Replay a routing trace through the storage levels: device slots per layer -> host cache -> disk.

A trace is a sequence of `Step`s, one per (decode step, MoE layer) in execution order, holding every
expert id the batch routes to at that layer (and the groups chosen, for the `group` policy). Each
distinct expert of a step is one lookup: a device hit, or a device miss that is a host hit, or a host
miss read from disk. Bytes read out of a level are counted per expert moved, so

  bytes_read['host'] = device misses x expert_bytes    (host -> device slot)
  bytes_read['disk'] = host misses   x expert_bytes    (disk -> host)

With a real `ExpertStore`, host misses are read from it (and kept in the host cache), so the disk
bytes can be checked against what TensorStore itself read (tests/test_store_cache.py does).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from litejax.inference.store.cache import HostCache, SlotCache


@dataclasses.dataclass(frozen=True)
class Step:
  layer: int
  experts: Sequence[int]                 # expert ids used at this layer in this decode step (any order)
  groups: Sequence[int] | None = None    # global group ids chosen (tier * G + group); None: derived


@dataclasses.dataclass
class LevelCounts:
  hits: int = 0
  misses: int = 0

  @property
  def hit_rate(self) -> float:
    return self.hits / max(self.hits + self.misses, 1)


@dataclasses.dataclass
class SimResult:
  expert_bytes: int
  device: LevelCounts
  host: LevelCounts
  per_layer: dict[int, LevelCounts]       # device level, per layer
  tokens: int

  @property
  def bytes_read(self) -> dict[str, int]:
    return {'host': self.device.misses * self.expert_bytes, 'disk': self.host.misses * self.expert_bytes}

  def to_json(self) -> dict[str, Any]:
    per_token = max(self.tokens, 1)
    return {
        'hit_rate': {'device': self.device.hit_rate, 'host': self.host.hit_rate},
        'misses': {'device': self.device.misses, 'host': self.host.misses},
        'bytes_read': self.bytes_read,
        'bytes_read_per_token': {k: v / per_token for k, v in self.bytes_read.items()},
        'expert_bytes': self.expert_bytes,
        'device_hit_rate_per_layer': {str(l): c.hit_rate for l, c in self.per_layer.items()},
    }


def simulate(trace: Iterable[Step], *, layers: Sequence[int], experts_per_layer: int, expert_bytes: int,
             device_slots: int, host_bytes: int, policy: str = 'lru', host_policy: str = 'lru',
             experts_per_group: int = 1, tokens: int = 0, store=None) -> SimResult:
  """Replays `trace`; `store` (an ExpertStore) makes host misses real reads. `tokens` only scales the
  per-token figures."""
  device = {l: SlotCache(device_slots, experts_per_layer, policy, experts_per_group) for l in layers}
  host = HostCache(host_bytes, expert_bytes, layers, experts_per_layer, host_policy, experts_per_group)
  res = SimResult(expert_bytes, LevelCounts(), LevelCounts(), {l: LevelCounts() for l in layers}, tokens)
  for step in trace:
    cache = device[step.layer]
    if policy == 'group':
      groups = step.groups if step.groups is not None else {int(e) // experts_per_group for e in step.experts}
      cache.note_groups(groups)
    acc = cache.access(step.experts)
    for counts in (res.device, res.per_layer[step.layer]):
      counts.hits += len(acc.hits)
      counts.misses += len(acc.misses)
    if not acc.misses:
      continue
    if host_policy == 'group':
      host.slots.note_groups({host.key(step.layer, e) // experts_per_group for e in acc.misses})
    hacc = host.access(step.layer, acc.misses)
    res.host.hits += len(hacc.hits)
    res.host.misses += len(hacc.misses)
    if store is not None and hacc.misses:
      ids = [k - host.layer_index[step.layer] * experts_per_layer for k in hacc.misses]
      arrays = store.read_experts(step.layer, ids)
      for i, e in enumerate(ids):
        host.put(step.layer, e, {name: a[i] for name, a in arrays.items()})
  return res


def trace_from_routing(expert_tnk, group_tnk=None, layers: Sequence[int] = ()) -> list[Step]:
  """Steps from per-layer routing decisions: expert_tnk[layer_pos][token] = that token's K expert ids,
  for tokens decoded one step at a time (batch 1). Order: token-major, layers in model order."""
  out = []
  n_tokens = len(expert_tnk[0]) if len(expert_tnk) else 0
  for t in range(n_tokens):
    for i, layer in enumerate(layers):
      groups = None if group_tnk is None else [int(g) for g in group_tnk[i][t]]
      out.append(Step(layer, [int(e) for e in expert_tnk[i][t]], groups))
  return out
