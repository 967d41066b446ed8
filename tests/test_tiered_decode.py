"""Decoding from the expert store (litejax.inference.store_decode): with miss='stall' tokens and logits are
bit-identical to the resident decode step for every policy and lookahead; bytes read from disk are
exactly the expert reads x expert bytes (TensorStore's own counter); the int8 fallback stays close."""
import numpy as np
import pytest

from litejax.model.transformer import init_model
from litejax.inference.store import layout
from litejax.inference.store.levels import ExpertLevels, LevelOptions
from litejax.inference.store.quant import int8_copies
from litejax.inference.store_decode import StoreRuntime
from store_helpers import bytes_read, resident, small_cfg, write_model_store
from train_helpers import enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
NEW = 6


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = small_cfg()
  model = init_model(cfg, seed=1)
  store = write_model_store(cfg, model, tmp_path_factory.mktemp('store'))
  return cfg, model, store, *resident(cfg, model, PROMPTS, NEW)


def run(setup, opts, **kw):
  cfg, model, store = setup[:3]
  tiers = ExpertLevels(store, opts, load_width=8, **kw)
  try:
    gen, logits = StoreRuntime(cfg, model, tiers).generate(PROMPTS, NEW, keep_logits=True)
  finally:
    tiers.close()
  return gen, logits, tiers


@pytest.mark.parametrize('opts', [LevelOptions(0.25, 0.5, 'lru', 0), LevelOptions(0.5, 0.5, 'group', 1),
                                  LevelOptions(0.125, 0.25, 'lfu', 2, lookahead_width=3),
                                  LevelOptions(0.25, 0.25, 'lru', 1, lookahead_width=4)],
                         ids=['lru', 'group-ahead1', 'lfu-ahead2-width3', 'lru-ahead1-width4-staged'])
def test_stall_is_bit_identical_to_resident_decoding(setup, opts):
  tokens, ref_logits = setup[3:]
  gen, logits, tiers = run(setup, opts)
  assert np.array_equal(np.asarray(gen.tokens), tokens)
  for step, (a, b) in enumerate(zip(logits, ref_logits)):
    assert np.array_equal(a, b), f'step {step}: max |diff| {np.abs(a - b).max()}'
  rep = tiers.report(NEW * len(PROMPTS))
  assert rep['misses']['device'] > 0 and rep['hit_rate']['device'] < 1   # the slots really were too few
  assert len(rep['lookahead_recall']) == opts.lookahead
  assert sum(rep['hit_rate'].values()) == pytest.approx(1.0)      # each lookup counted at one level
  # how much staging gets done before a layer runs depends on thread timing; what it did is counted
  assert 0 <= rep['staged_hits'] <= min(rep['staged'], rep['lookups'] * rep['hit_rate']['device'])


def test_staging_fills_slots_only_before_the_layer_runs(setup):
  store = setup[2]
  layer = store.layers[1]
  tiers = ExpertLevels(store, LevelOptions(0.25, 0.25, 'lru', 1), load_width=8)    # 4 slots: stages at most 2
  try:
    tiers.prefetch(layer, [3, 5, 6], depth=1)
    tiers.drain()
    cache, want = tiers.caches[layer], store.read_experts(layer, [3, 5])
    assert cache.slot_of[6] < 0 and tiers.counters.staged == 2
    for i, e in enumerate((3, 5)):
      for name, buf in tiers.slots[layer].buffers.items():
        assert np.array_equal(np.asarray(buf[cache.slot_of[e]]), want[name][i])
    slot = tiers.resolve(layer, [3, 7])
    c = tiers.counters
    assert (c.device_hits, c.staged_hits, slot[3]) == (1, 1, cache.slot_of[3])
    tiers.prefetch(layer, [9], depth=1)       # the layer has run in this step: no staging into it
    tiers.drain()
    assert cache.slot_of[9] < 0
    tiers.end_step()
    tiers.prefetch(layer, [9], depth=1)
    tiers.drain()
    assert cache.slot_of[9] >= 0 and 7 in cache.resident()    # 7 was used this step: not evicted
  finally:
    tiers.close()


def test_a_wait_for_a_prefetch_in_flight_counts_once(setup, monkeypatch):
  """A lookup whose prefetch read is still in flight waits for it and counts as a disk lookup (a prefetch
  wait), not also as a host hit: the hit rates sum to 1 (they summed to more with --lookahead >= 1)."""
  import threading
  store = setup[2]
  layer, arrived = store.layers[1], threading.Event()
  real = store.read_experts_async

  class Slow:
    """A read that arrives once `arrived` is set."""
    def __init__(self, pending):
      self.pending, self.ids, self.counted = pending, pending.ids, False

    def done(self):
      return arrived.is_set() and self.pending.done()

    def result(self):
      arrived.wait()
      return self.pending.result()

  monkeypatch.setattr(store, 'read_experts_async', lambda *a: Slow(real(*a)))
  tiers = ExpertLevels(store, LevelOptions(0.25, 0.25, 'lru', 1, stage=False), load_width=8)
  try:
    tiers.prefetch(layer, [3, 5], depth=1)
    threading.Timer(0.2, arrived.set).start()
    tiers.resolve(layer, [3, 5, 6])
    c = tiers.counters
    # the first lookup waits for the read of both (3 and 5), the second then finds it in the host level
    assert (c.prefetch_waits, c.host_hits, c.disk_demand, c.lookups) == (1, 1, 1, 3)
    rep = tiers.report(1)
    assert rep['hit_rate'] == pytest.approx({'device': 0, 'host': 1 / 3, 'disk': 2 / 3, 'fallback': 0})
    assert sum(rep['hit_rate'].values()) == pytest.approx(1.0)
    assert rep['io_wait_ms_per_token'] > 0
  finally:
    arrived.set()
    tiers.close()


def test_lookup_log_holds_every_wave_by_step_and_layer(setup):
  """ExpertLevels.lookup_log: (steps ended, layer, experts) for every resolve, step 0 the prefill; its distinct
  experts are the lookups the report counts."""
  cfg, model, store = setup[:3]
  tiers = ExpertLevels(store, LevelOptions(0.25, 0.5, 'lru', 0), load_width=8)
  tiers.lookup_log = []
  try:
    StoreRuntime(cfg, model, tiers).generate(PROMPTS, NEW)
  finally:
    tiers.close()
  log = tiers.lookup_log
  assert {step for step, _, _ in log} == set(range(NEW)) and tiers.steps_ended == NEW
  assert all({layer for s, layer, _ in log if s == step} == set(store.layers) for step in range(NEW))
  assert sum(len(set(experts)) for _, _, experts in log) == tiers.report(1)['lookups']


def test_bytes_read_are_misses_times_expert_bytes(setup):
  before = bytes_read()
  _, _, tiers = run(setup, LevelOptions(0.25, 0.25, 'lru', 1))    # close() waits for the prefetch thread
  rep = tiers.report(1)
  assert rep['disk_reads'] > 0
  assert rep['bytes_read']['disk'] == rep['disk_reads'] * rep['expert_bytes']
  # TensorStore also reads each chunk's 4-byte checksum: exactly those chunks, no more
  assert bytes_read() - before == rep['disk_reads'] * setup[2].chunk_bytes_per_expert
  assert rep['bytes_read']['host'] == rep['device_loads'] * rep['expert_bytes']
  assert 0 <= rep['prefetch_wasted_reads'] <= rep['prefetch_reads']
  assert rep['prefetch_wasted_bytes_per_token'] == rep['prefetch_wasted_reads'] * rep['expert_bytes']
  assert rep['expert_bytes'] == layout.expert_bytes(setup[0])


def test_fallback_uses_int8_copies_and_stays_close(setup):
  store = setup[2]
  gen, logits, tiers = run(setup, LevelOptions(0.25, 0.25, 'lru', 0, 'fallback'), int8=int8_copies(store))
  rep = tiers.report(1)
  assert rep['fallbacks'] > 0
  ref = setup[4]
  diffs = [float(np.abs(a - b).max()) for a, b in zip(logits, ref)]
  assert max(diffs) > 0          # the int8 copies were really used
  assert max(diffs) < 0.1 * max(float(np.abs(b).max()) for b in ref)


@pytest.mark.parametrize('field,opts,match', [
    ('--device-slots', LevelOptions(device_slots=0), 'device-slots'),
    ('--host-cache', LevelOptions(host_cache=1.5), 'host-cache'),
    ('--policy', LevelOptions(policy='fifo'), 'policy'),
    ('--lookahead', LevelOptions(lookahead=-1), 'lookahead'),
    ('--lookahead-width', LevelOptions(lookahead_width=0), 'lookahead-width'),
    ('--miss', LevelOptions(miss='skip'), 'miss')])
def test_bad_options_name_the_flag(field, opts, match):
  with pytest.raises(ValueError, match=match):
    opts.validate()


def test_generate_store_cli_json_and_png(tmp_path, capsys):
  """`litejax generate --store` on an --init store (no checkpoint): the JSON `store` key and the PNG."""
  import json

  from litejax.cli import main
  from litejax.inference.store.writer import write_random
  write_random(str(tmp_path / 'store'), small_cfg(), 0)
  png = tmp_path / 'store.png'
  assert main(['generate', '--store', str(tmp_path / 'store'),
               '--prompt', 'In the', '--max-new-tokens', '3', '--device-slots', '0.25', '--lookahead', '1',
               '--lookahead-width', '2', '--policy', 'group', '--json', '--plot', str(png)]) == 0
  out = json.loads(capsys.readouterr().out)
  s = out['store']
  for key in ('hit_rate', 'lookahead_recall', 'bytes_read_per_token', 'expert_bytes', 'misses', 'stall_ms_per_token'):
    assert key in s
  assert set(s['hit_rate']) == {'device', 'host', 'disk', 'fallback'} and len(s['lookahead_recall']) == 1
  assert s['bytes_read']['disk'] == s['disk_reads'] * s['expert_bytes']
  assert s['lookahead_width'] == 2 and 'prefetch_wasted_bytes_per_token' in s
  assert s['pregate'] == 0 and 0 <= s['io_wait_ms_per_token'] <= s['stall_ms_per_token']
  assert sum(s['hit_rate'].values()) == pytest.approx(1.0) and sum(s['decode_hit_rate'].values()) == pytest.approx(1.0)
  assert set(s['decode_device_hit_rate_per_layer']) == {'0', '1'}
  assert 'io_ms_per_step_p50' in out['latency_split'] and len(out['tokens'][0]) == 3
  assert png.stat().st_size > 0
  assert main(['generate', '--store', str(tmp_path / 'store'), '--prompt', 'x', '--policy', 'fifo']) == 2
  assert '--policy' in capsys.readouterr().err


@pytest.mark.parametrize('miss', ['stall', 'fallback'])
def test_generate_stops_on_a_damaged_chunk_naming_it(tmp_path, capsys, miss):
  """The issue's case: a flipped byte in one expert chunk, then `generate --store --device-slots 1.0`: one
  line naming layer, array and expert, exit 1, nothing decoded (with --miss fallback its int8 copy cannot be
  made from an intact read, so it stops too); `export-experts --verify` lists that chunk."""
  from fault_helpers import damage
  from litejax.cli import main
  from litejax.inference.store.writer import write_random
  write_random(str(tmp_path / 'store'), small_cfg(), 0)
  damage(tmp_path / 'store' / layout.array_path(0, 'w_out') / 'c' / '15' / '0' / '0', 'flip')
  prompt = 'In the beginning God created the heaven and the earth.'    # long enough to route to every expert
  assert main(['generate', '--store', str(tmp_path / 'store'), '--prompt', prompt, '--max-new-tokens', '3',
               '--device-slots', '1.0', '--miss', miss]) == 1
  out, err = capsys.readouterr()
  assert out == '' and len(err.splitlines()) == 1 and 'Traceback' not in err, err
  assert err.startswith(f'litejax generate: expert store {tmp_path}/store: layer 0 expert 15: w_out chunk is '
                        'damaged: its CRC-32C checksum differs'), err
  assert err.rstrip().endswith(f'check the whole store with `litejax export-experts --verify {tmp_path}/store`')
  assert main(['export-experts', '--verify', str(tmp_path / 'store')]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and 'layer 0 expert 15: w_out chunk is damaged' in lines[0], lines
  assert lines[1].startswith(f'checked 96 chunks (2 layers x 3 arrays x 16 experts) of {tmp_path}/store: 1 damaged')


def test_store_from_a_checkpoint_decodes_with_that_checkpoint(tmp_path, capsys):
  """A store exported from a checkpoint holds only experts: `generate --store` takes the other weights from
  the checkpoint its manifest names (never a fresh init), equal to decoding the checkpoint resident; a
  checkpoint of another step, or a missing one, is an error before anything is decoded."""
  import json
  import shutil

  from litejax.cli import main
  from litejax.train.loop import train
  from train_helpers import TINY, TINY_YAML
  from litejax.config import load_config
  ckpt = tmp_path / 'ckpt'
  train(load_config(TINY_YAML, TINY + ['train.steps=2', 'train.ckpt_every=1']), ckpt_dir=ckpt, quiet=True)
  assert main(['export-experts', '--ckpt-dir', str(ckpt), '--out', str(tmp_path / 'store')]) == 0
  capsys.readouterr()
  gen = ['generate', '--prompt', 'In the', '--max-new-tokens', '4', '--json']
  assert main(gen + ['--ckpt-dir', str(ckpt)]) == 0
  resident = json.loads(capsys.readouterr().out)['tokens']
  assert main(gen + ['--store', str(tmp_path / 'store'), '--device-slots', '0.25']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['tokens'] == resident and out['store']['weights'] == f'checkpoint {ckpt}'
  # step 1 of the same run: the store's experts are step 2's
  older = tmp_path / 'older'
  shutil.copytree(ckpt, older)
  shutil.rmtree(older / '2')
  assert main(gen + ['--store', str(tmp_path / 'store'), '--ckpt-dir', str(older)]) == 2
  assert 'step 2' in capsys.readouterr().err
  shutil.rmtree(ckpt)
  assert main(gen + ['--store', str(tmp_path / 'store')]) == 2
  assert 'pass --ckpt-dir' in capsys.readouterr().err
