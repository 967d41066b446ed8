"""Expert caches with a static number of slots, as plain Python + NumPy (no JAX): the policy half of the
device level and of the host level.

A `SlotCache` has `num_slots` slots, an expert->slot table `slot_of` [num_keys] (-1: not resident) and a
slot->expert array `key_of` [num_slots] (-1: empty), so a decode step can gather from a fixed-shape slot
buffer. Eviction policies (the victim is the resident key with the smallest priority tuple; keys used in
the current step are never evicted):

  lru    (last use)                                         mixtral-offloading's per-layer LRU
  lfu    (uses since the start, last use)                   frequency with LRU tie-break
  group  (last time the key's group was routed to, last use)

`group` uses the hierarchical router: a token's tier and group decisions are made before the expert
level, so they are known when its experts are looked up. It is Belady's MIN (Belady 1966, "A study of
replacement algorithms for a virtual-storage computer") approximated with that partial foresight:
MIN evicts what will be used furthest in the future, and an expert whose group has not been chosen
for the longest time is the one least likely to be needed soon, since only experts of chosen groups can
be. Group choice, over T*G groups rather than E experts, is also a steadier recency signal.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

POLICIES = ('lru', 'lfu', 'group')


@dataclasses.dataclass(frozen=True)
class Access:
  """The outcome of one step's lookups: slot of each requested key, hits and misses in request order."""
  slots: np.ndarray            # int32 [n] slot of each requested key (after admission)
  hits: list[int]
  misses: list[int]            # unique keys, first-request order; each was admitted
  evicted: list[int]           # keys evicted to make room, one per miss that found no free slot


class SlotCache:
  """A fixed number of slots over keys 0..num_keys-1 with an eviction policy."""

  def __init__(self, num_slots: int, num_keys: int, policy: str = 'lru', keys_per_group: int = 1):
    if policy not in POLICIES:
      raise ValueError(f'policy: must be one of {list(POLICIES)}, got {policy!r}')
    if not 0 < num_slots <= num_keys:
      raise ValueError(f'num_slots: must be in [1, num_keys={num_keys}], got {num_slots}')
    if keys_per_group <= 0 or num_keys % keys_per_group:
      raise ValueError(f'keys_per_group ({keys_per_group}) must divide num_keys ({num_keys})')
    self.num_slots, self.num_keys, self.policy, self.keys_per_group = num_slots, num_keys, policy, keys_per_group
    self.slot_of = np.full(num_keys, -1, np.int32)
    self.key_of = np.full(num_slots, -1, np.int32)
    self.last_use = np.zeros(num_slots, np.int64)              # per slot
    self.uses = np.zeros(num_keys, np.int64)                    # per key, whole history (lfu)
    self.group_last = np.zeros(num_keys // keys_per_group, np.int64)   # per group (group)
    self.clock = 0

  def resident(self) -> set[int]:
    return {int(k) for k in self.key_of if k >= 0}

  def note_groups(self, groups: Iterable[int]) -> None:
    """The router's group decision for the coming step (known before the expert level)."""
    self.clock += 1
    self.group_last[np.asarray(list(groups), np.int64)] = self.clock

  def access(self, keys: Sequence[int], protected: Iterable[int] = ()) -> Access:
    """Looks up one step's keys (duplicates allowed), admitting every miss; returns where each key is.
    protected: keys no admission may evict besides the step's own (a pre-gated model's pending layers')."""
    self.clock += 1
    keys = [int(k) for k in keys]
    unique = list(dict.fromkeys(keys))
    if len(unique) > self.num_slots:
      raise ValueError(f'one step uses {len(unique)} distinct keys but the cache has {self.num_slots} slots')
    hits, misses, evicted = [], [], []
    for k in unique:
      if self.slot_of[k] >= 0:
        hits.append(k)
      else:
        misses.append(k)
    protected = set(unique) | set(int(k) for k in protected)
    for k in misses:
      out = self._admit(k, protected)
      if out is not None:
        evicted.append(out)
    for k in unique:    # one tick per key, so recency ties within a step break in request order
      self.clock += 1
      self.last_use[self.slot_of[k]] = self.clock
    np.add.at(self.uses, np.asarray(keys, np.int64), 1)
    self.group_last[np.unique(np.asarray(unique, np.int64) // self.keys_per_group)] = self.clock
    return Access(slots=self.slot_of[np.asarray(keys, np.int64)].copy(), hits=hits, misses=misses, evicted=evicted)

  def prefetch(self, keys: Sequence[int], protected: Iterable[int] = ()) -> list[int]:
    """Admits keys ahead of use (router lookahead) without counting a use; returns those admitted."""
    admitted = []
    keep = set(int(k) for k in protected) | set(int(k) for k in keys)
    for k in dict.fromkeys(int(k) for k in keys):
      if self.slot_of[k] < 0:
        self._admit(k, keep)
        self.last_use[self.slot_of[k]] = self.clock
        admitted.append(k)
    return admitted

  def _admit(self, key: int, protected: set[int]) -> int | None:
    """Puts `key` in a free slot or the policy's victim's; returns the evicted key or None."""
    free = np.flatnonzero(self.key_of < 0)
    if free.size:
      slot, victim = int(free[0]), None
    else:
      slot = self._victim_slot(protected)
      victim = int(self.key_of[slot])
      self.slot_of[victim] = -1
    self.key_of[slot] = key
    self.slot_of[key] = slot
    return victim

  def _victim_slot(self, protected: set[int]) -> int:
    keys = self.key_of.astype(np.int64)
    candidates = np.flatnonzero([int(k) not in protected for k in keys])
    if not candidates.size:
      raise ValueError('every slot holds a key of the current step: no slot can be evicted')
    last = self.last_use[candidates]
    if self.policy == 'lru':
      order = np.argsort(last, kind='stable')
    elif self.policy == 'lfu':
      order = np.lexsort((last, self.uses[keys[candidates]]))
    else:
      order = np.lexsort((last, self.group_last[keys[candidates] // self.keys_per_group]))
    return int(candidates[order[0]])


class HostCache:
  """The host level: a byte budget over (layer, expert) keys, each entry one expert's arrays (or None when
  only simulating). Eviction as SlotCache (default LRU)."""

  def __init__(self, budget_bytes: int, expert_bytes: int, layers: Sequence[int], experts_per_layer: int,
               policy: str = 'lru', experts_per_group: int = 1):
    capacity = min(budget_bytes // expert_bytes, len(layers) * experts_per_layer)
    if capacity < 1:
      raise ValueError(f'host cache budget {budget_bytes} B holds no expert of {expert_bytes} B')
    self.expert_bytes, self.capacity = expert_bytes, int(capacity)
    self.layer_index = {layer: i for i, layer in enumerate(layers)}
    self.experts_per_layer = experts_per_layer
    self.slots = SlotCache(self.capacity, len(layers) * experts_per_layer, policy, experts_per_group)
    self.payload: list[object | None] = [None] * self.capacity

  def key(self, layer: int, expert: int) -> int:
    return self.layer_index[layer] * self.experts_per_layer + int(expert)

  def access(self, layer: int, experts: Sequence[int]) -> Access:
    return self.slots.access([self.key(layer, e) for e in experts])

  def get(self, layer: int, expert: int):
    slot = self.slots.slot_of[self.key(layer, expert)]
    return None if slot < 0 else self.payload[slot]

  def put(self, layer: int, expert: int, value) -> None:
    self.payload[self.slots.slot_of[self.key(layer, expert)]] = value
