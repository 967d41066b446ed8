"""A damaged expert chunk at decode time (issue 20): detected on every read path of the storage levels
(preload, demand miss, prefetch, the int8 copies), or with miss='fallback' run on an int8 copy made from an
intact read and reported. No model is compiled: the levels are driven directly."""
import pathlib

import numpy as np
import pytest

from fault_helpers import DAMAGES, damage
from litejax.inference.store import layout
from litejax.inference.store.layout import ChunkDamagedError
from litejax.inference.store.levels import ExpertLevels, LevelOptions
from litejax.inference.store.quant import int8_copies
from litejax.inference.store.writer import StoreWriter
from store_helpers import small_cfg

CFG = small_cfg()
E = CFG.moe.experts_total


@pytest.fixture
def store(tmp_path):
  rng = np.random.default_rng(0)
  w = StoreWriter(str(tmp_path / 'store'), CFG)
  for layer in layout.moe_layers(CFG):
    w.write(layer, 0, {name: rng.standard_normal((E, *shape)).astype(np.float32)
                       for name, shape in layout.expert_shapes(CFG).items()})
  return w.finish({'kind': 'test'})


def _damage(store, layer, name, expert, how='flip'):
  damage(pathlib.Path(store.location) / layout.array_path(layer, name) / 'c' / str(expert) / '0' / '0', how)


def _levels(store, **kw):
  opts = LevelOptions(**{'device_slots': 0.25, 'host_cache': 0.25, **kw})
  return ExpertLevels(store, opts, load_width=4, int8=int8_copies(store) if opts.miss == 'fallback' else None)


def _is(error, layer, name, expert):
  return (error.layer, error.array, error.expert) == (layer, name, expert) and \
      f'layer {layer} expert {expert}: {name} chunk is' in str(error)


@pytest.mark.parametrize('how', DAMAGES)
def test_demand_miss_stops_naming_layer_array_expert(store, how):
  levels = _levels(store)
  try:
    levels.resolve(1, [2])                                      # intact experts read as before
    _damage(store, 1, 'w_gate', 6, how)
    with pytest.raises(ChunkDamagedError) as e:
      levels.resolve(1, [6, 3])
    assert _is(e.value, 1, 'w_gate', 6)
  finally:
    levels.close()


def test_preload_stops_on_a_damaged_chunk(store):
  _damage(store, 0, 'w_in', 5)
  for device, host in (([5], []), ([], [4, 5])):
    levels = _levels(store)
    try:
      with pytest.raises(ChunkDamagedError) as e:
        levels.preload(0, device, host)
      assert _is(e.value, 0, 'w_in', 5)
    finally:
      levels.close()


def test_prefetch_finds_it_and_the_next_resolve_stops(store):
  """The prefetch thread's read fails: recorded there, raised by the decoding thread's next lookup."""
  _damage(store, 1, 'w_out', 9)
  levels = _levels(store, lookahead=1)
  try:
    levels.prefetch(1, [9, 1], depth=1)
    levels.drain()
    with pytest.raises(ChunkDamagedError) as e:
      levels.resolve(0, [0])
    assert _is(e.value, 1, 'w_out', 9)
  finally:
    levels.close()


def test_int8_copies_are_made_from_intact_reads_only(store):
  _damage(store, 1, 'w_in', 12, 'truncate')
  with pytest.raises(ChunkDamagedError) as e:
    int8_copies(store)
  assert _is(e.value, 1, 'w_in', 12)


@pytest.mark.parametrize('found_by', ['demand', 'prefetch'])
def test_fallback_runs_a_damaged_expert_on_its_intact_int8_copy_and_says_so(store, found_by):
  """Copies made while the store was intact; then a chunk is damaged: with miss='fallback' that expert runs
  on its int8 copy from then on (never read again), the others are read as before, and the report lists it."""
  levels = _levels(store, miss='fallback', lookahead=1)
  try:
    _damage(store, 1, 'w_out', 6)
    if found_by == 'prefetch':
      levels.prefetch(1, [6], depth=1)
    else:
      assert levels.resolve(1, [6, 2]) == {6: -1, 2: -2} and levels.fallback_ids == [6, 2]
    levels.drain()                                    # the background read has failed by now
    levels.end_step()
    for _ in range(2):
      slot = levels.resolve(1, [2, 6])
      assert slot[6] < 0 and levels.fallback_ids[-1 - slot[6]] == 6
      levels.drain()
      levels.end_step()
    assert slot[2] >= 0                               # the intact expert was read again and is in a slot
    rep = levels.report(1)
    assert [(d['layer'], d['array'], d['expert'], d['ran_on']) for d in rep['damaged_chunks']] == \
        [(1, 'w_out', 6, 'int8 copy')]
    assert 'CRC-32C checksum differs' in rep['damaged_chunks'][0]['error']
  finally:
    levels.close()
