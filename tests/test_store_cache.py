"""Cache policies against plain reference implementations and Belady's optimum; the tier simulator's
bytes against TensorStore's own read counter."""
import collections

import numpy as np
import pytest

from litejax.inference.store import layout
from litejax.inference.store.cache import POLICIES, SlotCache
from litejax.inference.store.simulate import Step, simulate, trace_from_routing
from litejax.inference.store.writer import write_random
from store_helpers import bytes_read, small_cfg


def skewed_trace(rng, steps, num_keys, k, groups=4):
  """Per step k distinct keys, drawn with locality: a few hot groups, Zipf-like inside."""
  per_group = num_keys // groups
  p = 1.0 / np.arange(1, per_group + 1)
  group_p = np.array([0.55, 0.25, 0.15, 0.05])[:groups]
  out = []
  for _ in range(steps):
    g = rng.choice(groups, p=group_p / group_p.sum())
    local = rng.choice(per_group, size=k, replace=False, p=p / p.sum())
    out.append([int(g * per_group + e) for e in local])
  return out


def lru_reference(trace, slots):
  cache, hits = collections.OrderedDict(), []
  for keys in trace:
    step_hits = []
    for key in dict.fromkeys(keys):
      if key in cache:
        step_hits.append(key)
    for key in dict.fromkeys(keys):
      if key not in cache:
        if len(cache) >= slots:
          victim = next(k for k in cache if k not in keys)   # least recent, not used this step
          del cache[victim]
        cache[key] = True
    for key in dict.fromkeys(keys):
      cache.move_to_end(key)
    hits.append(step_hits)
  return hits


def lfu_reference(trace, slots):
  resident, uses, last, hits, tick = set(), collections.Counter(), {}, [], 0
  for keys in trace:
    hits.append([k for k in dict.fromkeys(keys) if k in resident])
    for key in dict.fromkeys(keys):
      if key not in resident:
        if len(resident) >= slots:
          resident.remove(min((k for k in resident if k not in keys), key=lambda k: (uses[k], last[k])))
        resident.add(key)
    for key in keys:
      uses[key] += 1
    for key in dict.fromkeys(keys):
      tick += 1
      last[key] = tick
  return hits


def belady_hits(trace, slots):
  """Belady's MIN: evict the resident key whose next use is furthest away (the optimum)."""
  resident, total = set(), 0
  for t, keys in enumerate(trace):
    step = set(keys)
    total += len(step & resident)
    for key in step - resident:
      if len(resident) >= slots:
        def next_use(k):
          return next((u for u in range(t + 1, len(trace)) if k in trace[u]), len(trace) + 1)
        resident.remove(max(resident - step, key=next_use))
      resident.add(key)
  return total


def run(policy, trace, slots, num_keys, per_group=1):
  cache, hits = SlotCache(slots, num_keys, policy, per_group), []
  for keys in trace:
    if policy == 'group':
      cache.note_groups({k // per_group for k in keys})
    acc = cache.access(keys)
    hits.append(acc.hits)
    # The two tables are inverse to each other and the requested keys sit where `slots` says.
    res = cache.key_of >= 0
    assert np.array_equal(cache.slot_of[cache.key_of[res]], np.flatnonzero(res))
    assert (cache.slot_of >= 0).sum() == res.sum()
    assert np.array_equal(cache.key_of[acc.slots], keys)
  return hits


@pytest.mark.parametrize('slots', [3, 8])
def test_lru_and_lfu_match_references(slots):
  trace = skewed_trace(np.random.default_rng(slots), 300, 32, 2)
  assert run('lru', trace, slots, 32) == lru_reference(trace, slots)
  assert run('lfu', trace, slots, 32) == lfu_reference(trace, slots)


def test_every_policy_is_at_most_belady_and_beats_nothing_on_locality():
  trace = skewed_trace(np.random.default_rng(0), 200, 64, 2)
  best = belady_hits(trace, 8)
  for policy in POLICIES:
    hits = sum(len(h) for h in run(policy, trace, 8, 64, per_group=16))
    assert 0.3 * best < hits <= best, (policy, hits, best)


def test_group_policy_keeps_the_chosen_groups_experts():
  # Groups of 4 keys, 3 slots. Group 0 is chosen at every step; group 1 and 2 once each, in between.
  trace = [[0], [1], [4], [2], [8]]
  lru = SlotCache(3, 12, 'lru', 4)
  group = SlotCache(3, 12, 'group', 4)
  for keys in trace:
    lru.access(keys)
    group.note_groups({k // 4 for k in keys})
    group.access(keys)
  # At [8], LRU evicts 1 (used longest ago) though its group 0 was chosen last step; group-LRU evicts 4.
  assert lru.resident() == {2, 4, 8} and group.resident() == {1, 2, 8}


def test_prefetch_admits_without_a_use_and_a_step_never_evicts_its_own_keys():
  c = SlotCache(2, 8, 'lru')
  c.access([1, 2])
  assert c.prefetch([3], protected=[2]) == [3] and c.resident() == {2, 3}
  assert c.access([3]).hits == [3]
  with pytest.raises(ValueError, match='3 distinct keys but the cache has 2 slots'):
    c.access([4, 5, 6])


def test_access_never_evicts_protected_keys():
  """A pre-gated model's pending layers' experts (litejax.inference.store.levels pins them): an access
  evicts around them, by the policy among the rest."""
  c = SlotCache(3, 8, 'lfu')
  c.access([1])
  c.access([1, 2])
  c.prefetch([3])                      # no use yet: lfu's first victim
  c.access([4], protected=[3])
  assert c.resident() == {1, 3, 4}     # 2 (one use) went, not 3
  with pytest.raises(ValueError, match='no slot can be evicted'):
    c.access([5], protected=[1, 3, 4])


def test_prediction_ledger_counts_every_wave_of_a_step():
  """Recall and wasted prefetch reads compare a step's predictions with everything a layer used in the
  step, over all its waves (a layer with more experts than slots looks them up in several)."""
  from litejax.inference.store.levels import LevelCounters
  from litejax.inference.store.accounting import PredictionLedger
  c = LevelCounters(recall_hit=[0, 0], recall_total=[0, 0])
  ledger = PredictionLedger()
  ledger.predicted[(1, 1)] = {3, 5, 7}
  ledger.predicted[(1, 2)] = {3}
  ledger.read[1] = {5, 7}
  ledger.used[1] = {3, 4}              # first wave
  ledger.used[1].update({5, 6})        # second wave
  ledger.used[0] = {1}                 # a layer without predictions counts for none
  ledger.settle(c)
  assert (c.recall_hit, c.recall_total, c.prefetch_wasted) == ([2, 1], [4, 4], 1)
  assert not (ledger.predicted or ledger.read or ledger.used)


def test_bad_arguments():
  with pytest.raises(ValueError, match='policy'):
    SlotCache(2, 8, 'fifo')
  with pytest.raises(ValueError, match='num_slots'):
    SlotCache(0, 8)


def test_simulated_bytes_equal_misses_times_expert_bytes_and_tensorstore_reads(tmp_path):
  cfg = small_cfg()
  e, eb = cfg.moe.experts_total, layout.expert_bytes(cfg)
  store = write_random(str(tmp_path / 'store'), cfg, seed=0)
  rng = np.random.default_rng(1)
  layers = layout.moe_layers(cfg)
  per_layer = [skewed_trace(rng, 40, e, cfg.moe.k_active) for _ in layers]
  trace = trace_from_routing(per_layer, layers=layers)
  assert [s.layer for s in trace[:4]] == [0, 1, 0, 1]
  before = bytes_read()
  res = simulate(trace, layers=layers, experts_per_layer=e, expert_bytes=eb, device_slots=4, host_bytes=10 * eb,
                 policy='lru', experts_per_group=cfg.moe.experts_per_group, tokens=40, store=store)
  read = bytes_read() - before
  assert res.bytes_read['disk'] == res.host.misses * eb
  assert read == res.host.misses * store.chunk_bytes_per_expert     # TensorStore also reads each chunk's checksum
  assert res.bytes_read['host'] == res.device.misses * eb
  assert res.device.hits + res.device.misses == sum(len(set(s.experts)) for s in trace)
  assert res.host.hits + res.host.misses == res.device.misses
  # The device tier alone is LRU per layer: its misses match the reference layer by layer.
  for i, layer in enumerate(layers):
    ref_hits = sum(len(h) for h in lru_reference(per_layer[i], 4))
    assert res.per_layer[layer].hits == ref_hits
  assert 0 < res.host.misses < res.device.misses
  j = res.to_json()
  assert j['bytes_read_per_token']['disk'] == res.host.misses * eb / 40 and set(j['hit_rate']) == {'device', 'host'}


def test_simulator_tiers_without_a_store():
  trace = [Step(0, [1, 2]), Step(0, [1, 3]), Step(0, [2, 3])]
  res = simulate(trace, layers=[0], experts_per_layer=4, expert_bytes=10, device_slots=2, host_bytes=40)
  # Device (2 slots, LRU): miss 1,2 | hit 1, miss 3 (evicts 2) | miss 2 (evicts 1), hit 3.
  assert (res.device.hits, res.device.misses) == (2, 4)
  # Host (4 experts): 1, 2, 3 are first reads; the second miss on 2 is a host hit.
  assert (res.host.hits, res.host.misses) == (1, 3)
  assert res.bytes_read == {'host': 40, 'disk': 30}
