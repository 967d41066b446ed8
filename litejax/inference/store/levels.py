"""The three storage levels at decode time (host side): per MoE layer a SlotCache + DeviceSlots (device level), one
HostCache of expert arrays (host level), the ExpertStore (disk level), a prefetch thread fed by router
lookahead or, for a pre-gated model, by the exact expert ids of the layers ahead (`prefetch(exact=True)`),
and the counters the `store` JSON reports.

`resolve(layer, experts)` is called once per wave of a layer, after routing and before the experts run:
every expert it returns a slot for is in that slot when it returns (stall), except that with
miss='fallback' an expert that is on disk only is given a fallback index instead (its int8 copy is
used) and is read into the host level in the background for later tokens.

Damage (a chunk that fails its read, litejax.inference.store.disk): a read on the decoding thread raises
its ChunkDamagedError; one on the prefetch thread is recorded and raised by the next `resolve`. With
miss='fallback' a damaged expert runs on its int8 copy from then on instead (every copy was made from an
intact read: `quant.int8_copies` raises otherwise), and the `store` report lists it under `damaged_chunks`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Any, Sequence

import numpy as np

from litejax.inference.store.cache import POLICIES, HostCache, SlotCache
from litejax.inference.store.disk import ExpertStore
from litejax.inference.store.layout import ChunkDamagedError
from litejax.inference.store.accounting import PredictionLedger, device_hit_rate_per_layer, hit_rates
from litejax.inference.store.slots import DeviceSlots

MISS_MODES = ('stall', 'fallback')


@dataclasses.dataclass(frozen=True)
class LevelOptions:
  """What `litejax generate --store` was asked for. Fractions are of each MoE layer's experts."""
  device_slots: float = 0.05
  host_cache: float = 0.1
  policy: str = 'lru'
  lookahead: int = 0
  miss: str = 'stall'
  lookahead_width: int = 1    # prefetch W·K candidates per token and layer (litejax.inference.store.lookahead)
  stage: bool = True          # lookahead also copies its depth-1 candidates into device slots (ExpertLevels.prefetch)

  def validate(self) -> None:
    """ValueError naming the flag and the constraint."""
    if not 0 < self.device_slots <= 1:
      raise ValueError(f'--device-slots: must be a fraction in (0, 1], got {self.device_slots}')
    if not 0 < self.host_cache <= 1:
      raise ValueError(f'--host-cache: must be a fraction in (0, 1], got {self.host_cache}')
    if self.policy not in POLICIES:
      raise ValueError(f'--policy: must be one of {list(POLICIES)}, got {self.policy!r}')
    if self.lookahead < 0:
      raise ValueError(f'--lookahead: must be >= 0, got {self.lookahead}')
    if self.lookahead_width < 1:
      raise ValueError(f'--lookahead-width: must be >= 1, got {self.lookahead_width}')
    if self.miss not in MISS_MODES:
      raise ValueError(f'--miss: must be one of {list(MISS_MODES)}, got {self.miss!r}')

  def num_slots(self, experts_per_layer: int) -> int:
    return max(1, min(experts_per_layer, math.ceil(self.device_slots * experts_per_layer)))

  def host_experts(self, experts_per_layer: int, layers: int) -> int:
    return max(1, min(experts_per_layer, math.ceil(self.host_cache * experts_per_layer))) * layers


@dataclasses.dataclass
class LevelCounters:
  lookups: int = 0            # (layer, expert) lookups, one per distinct expert per wave
  device_hits: int = 0
  host_hits: int = 0          # found in the host cache (or its prefetch had finished)
  prefetch_waits: int = 0     # prefetch read still in flight: waited for it (not a host hit)
  disk_demand: int = 0        # read from disk on demand (stall)
  fallbacks: int = 0          # ran on the int8 copy (miss='fallback')
  disk_reads: int = 0         # experts read from disk: demand + prefetch (each exactly expert_bytes)
  device_loads: int = 0       # experts copied host -> device slot
  stall_s: float = 0.0        # wall time inside resolve (lookups, waits, reads, slot loads)
  io_wait_s: float = 0.0      # of it, waiting on I/O: disk reads (demand, in flight), slot loads, staging
  recall_hit: list[int] = dataclasses.field(default_factory=list)    # per lookahead depth
  recall_total: list[int] = dataclasses.field(default_factory=list)
  prefetch_wasted: int = 0    # prefetch disk reads of experts the predicted layer did not use then
  staged: int = 0             # experts the lookahead copied host -> device slot ahead of their layer
  staged_hits: int = 0        # device hits on a staged expert (its first use since it was staged)
  layer_hits: dict[int, list[int]] = dataclasses.field(default_factory=dict)   # layer -> [lookups, device hits]


class ExpertLevels:
  """Device slots, host cache and disk for every MoE layer of one store."""

  def __init__(self, store: ExpertStore, opts: LevelOptions, load_width: int, int8=None):
    opts.validate()
    if opts.miss == 'fallback' and int8 is None:
      raise ValueError('--miss fallback needs the int8 copies (ExpertLevels(int8=...))')
    self.store, self.opts = store, opts
    e = store.num_experts
    self.num_slots = opts.num_slots(e)
    self.caches = {l: SlotCache(self.num_slots, e, opts.policy, store.experts_per_group) for l in store.layers}
    self.slots = {l: DeviceSlots(self.num_slots, store.shapes, store.dtype, min(load_width, self.num_slots))
                  for l in store.layers}
    self.host = HostCache(opts.host_experts(e, len(store.layers)) * store.expert_bytes, store.expert_bytes,
                          store.layers, e, opts.policy, store.experts_per_group)
    self.int8 = int8
    self.depths = opts.lookahead     # prediction depths recall is counted at (`expect_exact`)
    self.counters = self._fresh_counters()
    self._lock = threading.RLock()
    self._inflight: dict[tuple[int, int], Any] = {}    # (layer, expert) -> disk.PendingRead
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='prefetch')
    self._ledger = PredictionLedger()    # this step's predictions and prefetch reads vs what layers used
    # a list: every resolve appends (steps ended before it, layer, distinct experts); step 0 = the prefill
    self.lookup_log: list[tuple[int, int, list[int]]] | None = None
    self.steps_ended = 0
    self.fallback_ids: list[int] = []   # the last resolve's experts on their int8 copy, in fallback-index order
    # Staging (the prefetch thread writing device slots) and resolve exclude each other with _dev_lock; a
    # layer is `closed` from its first resolve of a step to end_step, and staging skips closed layers, so
    # a slot the running step's experts read is never overwritten.
    self._dev_lock = threading.RLock()
    self._closed: set[int] = set()
    self._staged: dict[int, set[int]] = {l: set() for l in store.layers}
    self.damaged: dict[tuple[int, int], ChunkDamagedError] = {}   # (layer, expert) whose read failed
    self._pinned: dict[int, set[int]] = {}    # exact prefetch: layer -> experts the host level keeps for it

  def _fresh_counters(self) -> LevelCounters:
    return LevelCounters(recall_hit=[0] * self.depths, recall_total=[0] * self.depths)

  def expect_exact(self, depth: int) -> None:
    """Before decoding a pre-gated model (moe.pregate = depth; `prefetch(exact=True)`): recall is counted per
    depth 1..depth (the counters restart)."""
    self.depths = max(self.opts.lookahead, depth)
    self.counters = self._fresh_counters()

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def drain(self) -> None:
    """Waits until every prefetch job submitted so far (reads into the host level, staging) is done."""
    self._pool.submit(lambda: None).result()    # one worker, jobs in order

  # -------------------------------------------------------------------------- host and disk levels

  def _host_get(self, layer: int, expert: int):
    with self._lock:
      value = self.host.get(layer, expert)
      if value is not None:
        self.host.access(layer, [expert])   # a use, for the host level's policy
      return value

  def _host_put(self, layer: int, experts: Sequence[int], arrays: dict[str, np.ndarray], use: bool) -> None:
    with self._lock:
      # never evicted: the experts exact prefetch holds for pending layers (while the new ones still fit)
      pinned = {self.host.key(l, e) for l, es in self._pinned.items() for e in es}
      keep = pinned if len(pinned) + len(experts) <= self.host.capacity else set()
      for i, e in enumerate(experts):
        key = self.host.key(layer, e)
        if use:
          self.host.slots.access([key], protected=keep)
        elif self.host.slots.slot_of[key] < 0:
          self.host.slots.prefetch([key], protected=keep)
        self.host.put(layer, e, {name: a[i] for name, a in arrays.items()})

  def _read_into_host(self, layer: int, experts: list[int]) -> dict[str, np.ndarray]:
    arrays = self.store.read_experts(layer, experts)
    self._host_put(layer, experts, arrays, use=False)
    with self._lock:
      self.counters.disk_reads += len(experts)
    return arrays

  def _complete(self, layer: int, pending) -> None:
    """Waits for an asynchronous read and puts its experts in the host level, once per read (the prefetch
    thread and a resolve that needs one of its experts may both get here). A damaged chunk is recorded
    (its read's other experts stay on disk); with miss='stall' it is raised as well."""
    try:
      arrays = pending.result()
    except ChunkDamagedError as e:
      with self._lock:
        self.damaged.setdefault((e.layer, e.expert), e)
        pending.counted = True
      if self.opts.miss == 'stall':
        raise
      return
    with self._lock:     # re-entrant: the put happens before the other caller can look for the experts
      if pending.counted:
        return
      pending.counted = True
      self.counters.disk_reads += len(pending.ids)
      self._host_put(layer, [int(e) for e in pending.ids], arrays, use=False)

  def _read_async(self, layer: int, experts: list[int]):
    """Issues the reads now (TensorStore reads every chunk concurrently on its own threads) and marks the
    experts in flight; the prefetch thread puts them in the host level when they arrive."""
    pending = self.store.read_experts_async(layer, experts)
    for e in experts:
      self._inflight[(layer, e)] = pending
    return pending

  def prefetch(self, layer: int, experts: Sequence[int], depth: int, exact: bool = False) -> None:
    """Lookahead: records the prediction for recall; on the background thread reads the experts that are
    on disk only into the host level and then (opts.stage, depth 1) copies the first candidates, best
    first, into device slots of `layer`: at most half its slots per step, evicting by the policy but never
    a candidate, and never once `layer` has run in this step.

    exact (pre-gated: the experts `layer` will use, known `depth` MoE layers ahead): the prediction holds at
    depths 1..depth, the host level keeps them until `layer` has run, and all (up to its slots) are staged.
    Jobs run in submission order, so the nearest layer's first."""
    ids = [int(e) for e in dict.fromkeys(int(e) for e in experts)]
    for d in range(1, depth + 1) if exact else (depth,):
      self._ledger.predicted[(layer, d)] = set(ids)
    todo = []
    with self._lock:
      if exact:
        self._pinned[layer] = set(ids)
      for e in ids:
        if self.caches[layer].slot_of[e] < 0 and self.host.get(layer, e) is None \
           and (layer, e) not in self._inflight:
          todo.append(e)
    stage = ids[:self.num_slots if exact else max(1, self.num_slots // 2)] if self.opts.stage and (
        exact or depth == 1) else []
    pending = None
    if todo:
      self._ledger.read.setdefault(layer, set()).update(todo)
      pending = self._read_async(layer, todo)
    if todo or stage:
      self._pool.submit(self._prefetch_job, layer, pending, stage)

  def _prefetch_job(self, layer: int, pending, stage: list[int]) -> None:
    if pending is not None:
      self._complete(layer, pending)
    if stage:
      self._stage(layer, stage)

  def _stage(self, layer: int, experts: list[int]) -> None:
    """Copies host-level experts into device slots of `layer` (device_put and the slot write are
    dispatched asynchronously: the copy overlaps whatever the device is running)."""
    with self._dev_lock:
      if layer in self._closed:
        return
      cache = self.caches[layer]
      with self._lock:
        values = {e: self.host.get(layer, e) for e in experts if cache.slot_of[e] < 0}
      values = {e: v for e, v in values.items() if v is not None}
      if not values:
        return
      cache.prefetch(list(values), protected=experts)
      self._staged[layer].update(values)
      self.load_slots(layer, [(int(cache.slot_of[e]), v) for e, v in values.items()])
      self.counters.staged += len(values)

  # -------------------------------------------------------------------------- device level

  def resolve(self, layer: int, experts: Sequence[int], groups: Sequence[int] = ()) -> dict[int, int]:
    """{expert: slot} for the distinct experts of one wave (at most num_slots); with miss='fallback' an
    expert that is on disk only maps to -1 - i, i its index in `fallback_ids`."""
    t0 = time.perf_counter()
    if self.damaged and self.opts.miss == 'stall':    # found by the prefetch thread
      raise next(iter(self.damaged.values()))
    c = self.counters
    unique = [int(e) for e in dict.fromkeys(int(e) for e in experts)]
    self._ledger.used.setdefault(layer, set()).update(unique)
    if self.lookup_log is not None:
      self.lookup_log.append((self.steps_ended, int(layer), [int(e) for e in experts]))
    cache = self.caches[layer]
    with self._dev_lock:     # waits for a slot write in progress; no staging into this layer after this
      self._closed.add(layer)
    io_s = time.perf_counter() - t0
    with self._lock:     # layers that have run keep no pins (this one keeps its own for its later waves)
      self._pinned = {l: es for l, es in self._pinned.items() if l not in self._closed or l == layer}
    if groups:
      cache.note_groups(groups)
    c.lookups += len(unique)
    resident = [e for e in unique if cache.slot_of[e] >= 0]
    c.device_hits += len(resident)
    per_layer = c.layer_hits.setdefault(layer, [0, 0])
    per_layer[0], per_layer[1] = per_layer[0] + len(unique), per_layer[1] + len(resident)
    staged = self._staged[layer]
    c.staged_hits += len(staged.intersection(resident))
    staged.difference_update(unique)
    need = [e for e in unique if cache.slot_of[e] < 0]
    arrays, fallback, on_disk = {}, [], []
    for e in need:
      value, waited = self._host_get(layer, e), False
      if value is None and (layer, e) in self._inflight:
        if self.opts.miss == 'fallback' and not self._inflight[(layer, e)].done():
          fallback.append(e)
          continue
        io_s += _timed(self._complete, layer, self._inflight.pop((layer, e)))   # waits for that read only
        value = self._host_get(layer, e)
        waited = value is not None
      if value is None and (layer, e) in self.damaged:          # miss='fallback': its int8 copy, for good
        fallback.append(e)
      elif value is None:
        on_disk.append(e)
      else:     # one level per lookup: a wait for a read in flight counts as disk (report), not as a host hit
        c.prefetch_waits += waited
        c.host_hits += not waited
        arrays[e] = value
    if self.opts.miss == 'fallback':
      fallback += on_disk
      c.fallbacks += len(fallback)
      if on_disk:
        self._pool.submit(self._complete, layer, self._read_async(layer, on_disk))
    elif on_disk:
      t_read = time.perf_counter()
      got = self.store.read_experts(layer, on_disk)
      io_s += time.perf_counter() - t_read
      self._host_put(layer, on_disk, got, use=True)
      c.disk_demand += len(on_disk)
      with self._lock:
        c.disk_reads += len(on_disk)
      for i, e in enumerate(on_disk):
        arrays[e] = {name: a[i] for name, a in got.items()}
    loaded = [e for e in unique if e not in fallback]
    access = cache.access(loaded) if loaded else None
    slot = {e: int(s) for e, s in zip(loaded, access.slots)} if access else {}
    io_s += _timed(self.load_slots, layer, [(slot[e], arrays[e]) for e in need if e in arrays])
    self.fallback_ids = fallback
    slot.update({e: -1 - i for i, e in enumerate(fallback)})
    for key in [k for k, f in self._inflight.items() if f.counted]:   # in the host level by now
      del self._inflight[key]
    c.stall_s += time.perf_counter() - t0
    c.io_wait_s += io_s
    return slot

  def load_slots(self, layer: int, items: list[tuple[int, dict[str, np.ndarray]]]) -> None:
    """Writes (slot, expert arrays) pairs into `layer`'s device slots, `load_width` per program call; the
    slot cache's bookkeeping is the caller's (SlotCache.access or .prefetch first)."""
    dev = self.slots[layer]
    for start in range(0, len(items), dev.load_width):
      chunk = items[start:start + dev.load_width]
      stacked = {name: np.stack([a[name] for _, a in chunk]) for name in self.store.shapes}
      dev.load([s for s, _ in chunk], stacked)
      with self._lock:
        self.counters.device_loads += len(chunk)

  def preload(self, layer: int, device: Sequence[int], host: Sequence[int] = ()) -> None:
    """Places experts before decoding (TierSets: the hot tiers in device slots, the warm ones in the host
    cache), then zeroes the counters, so that the run's figures count decoding only."""
    device = [int(e) for e in device]
    for start in range(0, len(device), self.num_slots):
      self.resolve(layer, device[start:start + self.num_slots])
    host = [int(e) for e in host]
    if host:
      self._read_into_host(layer, host)
    self.counters = self._fresh_counters()
    self._ledger.used.pop(layer, None)
    self._closed.discard(layer)

  def end_step(self) -> None:
    """Settles the step's predictions against every wave its layers looked up (recall, wasted prefetch
    reads: accounting.PredictionLedger) and reopens every layer to staging."""
    self._ledger.settle(self.counters)
    self.steps_ended += 1
    with self._lock:
      self._pinned = {}
    with self._dev_lock:
      self._closed.clear()

  def report(self, tokens: int, stall_s: float | None = None, io_wait_s: float | None = None,
             since: LevelCounters | None = None) -> dict:
    """The `store` JSON: hit rates per level (summing to 1), lookahead recall per depth, bytes read per token
    per level. stall_s, io_wait_s: the times to divide by `tokens` (default: all, prefill included). since:
    a copy of the counters after the prefill: `decode_hit_rate` (and per layer) then rate the decode steps'
    lookups alone."""
    c, eb = self.counters, self.store.expert_bytes
    stall_s, io_wait_s = (c.stall_s if stall_s is None else stall_s), (c.io_wait_s if io_wait_s is None else io_wait_s)
    tokens = max(tokens, 1)
    return {
        'hit_rate': hit_rates(c), 'device_hit_rate_per_layer': device_hit_rate_per_layer(c),
        **({'decode_hit_rate': hit_rates(c, since),
            'decode_device_hit_rate_per_layer': device_hit_rate_per_layer(c, since)} if since is not None else {}),
        'lookahead_recall': [h / t if t else None for h, t in zip(c.recall_hit, c.recall_total)],
        'bytes_read_per_token': {'disk': c.disk_reads * eb / tokens, 'host': c.device_loads * eb / tokens},
        'bytes_read': {'disk': c.disk_reads * eb, 'host': c.device_loads * eb},
        'expert_bytes': eb,
        # device misses: lookups not in a slot; host misses: of those, the ones not in host memory
        'misses': {'device': c.lookups - c.device_hits, 'host': c.lookups - c.device_hits - c.host_hits},
        'disk_reads': c.disk_reads, 'device_loads': c.device_loads, 'lookups': c.lookups,
        'prefetch_reads': c.disk_reads - c.disk_demand, 'fallbacks': c.fallbacks,
        # prefetch reads of experts the layer they were predicted for did not use (they may still hit later)
        'prefetch_wasted_reads': c.prefetch_wasted,
        'prefetch_wasted_bytes_per_token': c.prefetch_wasted * eb / tokens,
        # device hits that lookahead staging made: a staged expert found in its slot when its layer ran
        'staged': c.staged, 'staged_hits': c.staged_hits, 'stage': self.opts.stage,
        'stall_ms_per_token': 1e3 * stall_s / tokens,
        # of the stall, the time spent waiting on I/O: disk reads (on demand or in flight), slot loads, staging
        'io_wait_ms_per_token': 1e3 * io_wait_s / tokens,
        'slots_per_layer': self.num_slots, 'host_cache_experts': self.host.capacity,
        'policy': self.opts.policy, 'lookahead': self.opts.lookahead, 'miss': self.opts.miss,
        'lookahead_width': self.opts.lookahead_width,
        # chunks whose read failed (miss='fallback': each such expert ran on its int8 copy from then on)
        'damaged_chunks': [{'layer': d.layer, 'array': d.array, 'expert': d.expert, 'ran_on': 'int8 copy',
                            'error': str(d)} for _, d in sorted(self.damaged.items())],
        'pregate': self.depths - self.opts.lookahead,   # exact prefetch depth (moe.pregate; 0: none)
    }


def _timed(fn, *args) -> float:
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0
