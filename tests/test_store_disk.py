"""The disk tier: one uncompressed chunk per expert (measured), reads against NumPy, and every way a store
can be wrong is a clear error naming the layer and expert, never zeros."""
import json
import os

import numpy as np
import pytest
import tensorstore as ts

from litejax.inference.store import layout
from litejax.inference.store.disk import ExpertStore
from fault_helpers import DAMAGES, damage
from litejax.inference.store.layout import ChunkDamagedError, ExpertStoreError
from litejax.inference.store.writer import StoreWriter, check_destination, write_random
from store_helpers import bytes_read, small_cfg

CFG = small_cfg()
E = CFG.moe.experts_total


def reference_experts(seed=0):
  """Known arrays for every layer, written through StoreWriter in uneven blocks."""
  rng = np.random.default_rng(seed)
  return {layer: {name: rng.standard_normal((E, *shape)).astype(np.float32)
                  for name, shape in layout.expert_shapes(CFG).items()} for layer in layout.moe_layers(CFG)}


def write_reference(location, ref, context=None, cfg=CFG, overwrite=False):
  w = StoreWriter(str(location), cfg, overwrite=overwrite, context=context)
  for layer, arrays in ref.items():
    for start, stop in ((0, 5), (5, 6), (6, E)):
      w.write(layer, start, {k: v[start:stop] for k, v in arrays.items()})
  return w.finish({'kind': 'test'})


@pytest.fixture(scope='module')
def ref():
  return reference_experts()


@pytest.fixture
def store(tmp_path, ref):
  return write_reference(tmp_path / 'store', ref)


def test_reads_match_numpy_in_request_order(store, ref):
  ids = [7, 0, 15, 7, 3]
  for layer in store.layers:
    got = store.read_experts(layer, ids)
    assert sorted(got) == ['w_gate', 'w_in', 'w_out']
    for name, want in ref[layer].items():
      assert got[name].dtype == np.float32 and np.array_equal(got[name], want[ids]), (layer, name)
  pending = store.read_experts_async(1, np.array([2, 9]))
  assert np.array_equal(pending.result()['w_out'], ref[1]['w_out'][[2, 9]])


def test_one_chunk_file_per_expert_and_a_read_reads_only_its_bytes(store, tmp_path):
  d, h = CFG.model.d_model, CFG.moe.d_expert
  assert store.expert_bytes == layout.expert_bytes(CFG) == 3 * d * h * 4
  assert store.chunk_bytes_per_expert == store.expert_bytes + 3 * 4      # one 4-byte CRC-32C per array
  for layer in store.layers:
    for name, shape in layout.expert_shapes(CFG).items():
      root = tmp_path / 'store' / layout.array_path(layer, name) / 'c'
      files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
      assert len(files) == E, (layer, name)
      assert {os.path.getsize(f) for f in files} == {int(np.prod(shape)) * 4 + 4}
  for ids in ([5], [1, 2, 14], [3, 3]):
    before = bytes_read()
    store.read_experts(0, ids)
    assert bytes_read() - before == len(set(ids)) * store.chunk_bytes_per_expert, ids


def test_memory_kvstore(ref):
  ctx = ts.Context()
  s = write_reference('memory://experts', ref, context=ctx)
  assert np.array_equal(s.read_experts(1, [4])['w_in'][0], ref[1]['w_in'][4])
  with pytest.raises(ExpertStoreError, match='already holds an expert store; pass --overwrite'):
    StoreWriter('memory://experts', CFG, context=ctx)


def test_random_store_is_deterministic_and_independent_of_block_size(tmp_path):
  eb = layout.expert_bytes(CFG)
  a = write_random(str(tmp_path / 'a'), CFG, seed=3, block_bytes=3 * eb)     # blocks of 3, last one short
  b = write_random(str(tmp_path / 'b'), CFG, seed=3, block_bytes=E * eb)
  assert a.manifest['source'] == {'kind': 'init', 'seed': 3}
  ids = list(range(E))
  for layer in a.layers:
    x, y = a.read_experts(layer, ids), b.read_experts(layer, ids)
    for name in x:
      assert np.array_equal(x[name], y[name]), (layer, name)
      fan_in = layout.expert_shapes(CFG)[name][0]
      assert np.abs(x[name]).max() <= (3 / fan_in) ** 0.5 and np.abs(x[name]).std() > 0.2 * (1 / fan_in) ** 0.5
  # Layers and experts differ from each other.
  assert not np.array_equal(a.read_experts(0, [1])['w_in'], a.read_experts(1, [1])['w_in'])
  assert not np.array_equal(a.read_experts(0, [1])['w_in'], a.read_experts(0, [2])['w_in'])


def test_missing_chunk_is_an_error_naming_layer_and_expert(store, tmp_path):
  os.remove(tmp_path / 'store' / layout.array_path(1, 'w_gate') / 'c' / '6' / '0' / '0')
  with pytest.raises(ExpertStoreError, match=r'layer 1 expert 6: w_gate chunk is missing'):
    store.read_experts(1, [2, 6, 9])
  assert store.read_experts(1, [2, 9])['w_gate'].shape == (2, 16, 8)
  with pytest.raises(ExpertStoreError, match=r'layer 1 expert 6'):
    ExpertStore.open(str(tmp_path / 'store')).verify()


def test_short_chunk_is_an_error_naming_layer_and_expert(store, tmp_path):
  with open(tmp_path / 'store' / layout.array_path(0, 'w_out') / 'c' / '11' / '0' / '0', 'r+b') as f:
    f.truncate(100)
  with pytest.raises(ExpertStoreError, match=r'layer 0 expert 11: w_out chunk is short'):
    store.read_experts_async(0, [11, 0]).result()


def _chunk(tmp_path, layer, name, expert):
  return tmp_path / 'store' / layout.array_path(layer, name) / 'c' / str(expert) / '0' / '0'


WHY = {'flip': 'chunk is damaged: its CRC-32C checksum differs', 'truncate': 'chunk is short',
       'missing': 'chunk is missing'}


@pytest.mark.parametrize('how', DAMAGES)
def test_damaged_chunk_is_detected_on_every_read_naming_layer_array_expert(store, tmp_path, how):
  """A flipped byte (the checksum), a truncated chunk and a missing one: batched, single and asynchronous reads
  raise ChunkDamagedError naming layer, array and expert; the other experts still read; a whole-store check
  lists each damaged chunk."""
  damage(_chunk(tmp_path, 1, 'w_out', 6), how)
  damage(_chunk(tmp_path, 0, 'w_in', 15), how)
  for read in (lambda: store.read_experts(1, [2, 6, 9]), lambda: store.read_experts(1, [6]),
               lambda: store.read_experts_async(1, np.array([6, 0])).result()):
    with pytest.raises(ChunkDamagedError, match=rf'layer 1 expert 6: w_out {WHY[how]}') as e:
      read()
    assert (e.value.layer, e.value.array, e.value.expert) == (1, 'w_out', 6)
  assert store.read_experts(1, [2, 9])['w_out'].shape == (2, 8, 16)
  damaged = ExpertStore.open(str(tmp_path / 'store')).damaged_chunks()
  assert [(d.layer, d.array, d.expert) for d in damaged] == [(0, 'w_in', 15), (1, 'w_out', 6)]
  assert all(WHY[how] in str(d) for d in damaged)


def test_an_all_zero_expert_is_stored_not_taken_for_a_missing_one(tmp_path, ref):
  zeroed = {layer: {k: v.copy() for k, v in arrays.items()} for layer, arrays in ref.items()}
  zeroed[0]['w_in'][3] = 0.0
  store = write_reference(tmp_path / 'store', zeroed)
  assert not store.read_experts(0, [3])['w_in'].any() and store.damaged_chunks() == []


def test_store_written_before_checksums_names_the_reexport(store, tmp_path):
  edit_manifest(tmp_path / 'store', format_version=1, source={'kind': 'checkpoint', 'ckpt_dir': '/r/ck', 'step': 4})
  with pytest.raises(ExpertStoreError, match=r'format version 1, written before every chunk carried a checksum; '
                     rf'.*`litejax export-experts --ckpt-dir /r/ck --step 4 --out {tmp_path}/store --overwrite`'):
    ExpertStore.open(str(tmp_path / 'store'))


def test_unfinished_store_does_not_open(tmp_path, ref):
  w = StoreWriter(str(tmp_path / 's'), CFG)
  w.write(0, 0, {k: v[:4] for k, v in ref[0].items()})
  with pytest.raises(ExpertStoreError, match='no manifest.json'):
    ExpertStore.open(str(tmp_path / 's'))


def edit_manifest(path, **changes):
  m = json.loads((path / 'manifest.json').read_text())
  m.update(changes)
  (path / 'manifest.json').write_text(json.dumps(m))


@pytest.mark.parametrize('changes, words', [
    ({'arrays': {'w_in': [16, 4], 'w_gate': [16, 8], 'w_out': [8, 16]}},
     r'layer 0 w_in has shape \(16, 16, 8\), the manifest says \(16, 16, 4\)'),
    ({'dtype': 'bfloat16'}, r'layer 0 w_in has dtype float32, the manifest says bfloat16'),
    ({'experts_per_layer': 32}, r'layer 0 w_in has shape \(16, 16, 8\), the manifest says \(32, 16, 8\)'),
    ({'format_version': 99}, 'version 99'),
])
def test_store_disagreeing_with_its_manifest(store, tmp_path, changes, words):
  edit_manifest(tmp_path / 'store', **changes)
  with pytest.raises(ExpertStoreError, match=words):
    ExpertStore.open(str(tmp_path / 'store'))


def test_store_of_another_config(store, tmp_path):
  ExpertStore.open(str(tmp_path / 'store'), CFG)
  ExpertStore.open(str(tmp_path / 'store'), small_cfg('train.lr=0.1'))   # training settings do not matter
  with pytest.raises(ExpertStoreError, match=r'another config \(moe.d_expert: 8 in the store, 16 in the config\)'):
    ExpertStore.open(str(tmp_path / 'store'), small_cfg('moe.d_expert=16'))


def test_bad_ids_and_layers(store):
  with pytest.raises(ExpertStoreError, match=r'layer 0 expert 16 is out of range \[0, 16\)'):
    store.read_experts(0, [1, 16])
  with pytest.raises(ExpertStoreError, match='layer 5 is not an MoE layer'):
    store.read_experts(5, [1])


def test_destination_checks_write_nothing(tmp_path, store):
  ctx = ts.Context()
  check_destination(str(tmp_path / 'new'), False, ctx)
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  with pytest.raises(ExpertStoreError, match='holds no expert store; refusing'):
    StoreWriter(str(tmp_path / 'other'), CFG, overwrite=True)
  assert sorted(os.listdir(tmp_path / 'other')) == ['notes.txt']
  with pytest.raises(ExpertStoreError, match='pass --overwrite'):
    StoreWriter(str(tmp_path / 'store'), CFG)
  assert ExpertStore.open(str(tmp_path / 'store')).read_experts(0, [0])   # untouched
