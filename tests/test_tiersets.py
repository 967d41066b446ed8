"""TierSets (litejax.inference.tiersets, `generate --latency-budget-ms`): candidates from store.placement, the tier mask
threaded through the MoE block (val loss and tier selections per TierSet), the I/O term, the choice and its
error, and a tiny store decoded with the chosen mask (hot tiers preloaded: no I/O at all)."""
import json

import numpy as np
import pytest
from flax import nnx

from litejax.inference import tiersets
from litejax.model.transformer import init_model
from litejax.inference.store.levels import ExpertLevels, LevelOptions
from litejax.inference.store_decode import StoreRuntime
from store_helpers import small_cfg
from test_tiered_decode import write_model_store
from train_helpers import enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()

SMALL_TRAIN = ['model.seq_len=16', 'train.batch_size=2', 'store.placement=hot,cold']
BW = {'host_bytes_per_s': 1e9, 'disk_bytes_per_s': 1e8}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = small_cfg(*SMALL_TRAIN)
  model = init_model(cfg, seed=1)
  store = write_model_store(cfg, model, tmp_path_factory.mktemp('store'))
  rows = tiersets.evaluate(cfg, model, tiersets.candidates(cfg), tiersets.val_batches(cfg, 1, 2))
  return cfg, model, store, rows


def test_candidates_follow_placement():
  cfg = small_cfg('moe.num_tiers=4', 'store.placement=hot,warm,cold,cold')
  assert [(t.name, t.mask) for t in tiersets.candidates(cfg)] == [
      ('hot', (True, False, False, False)), ('hot+warm', (True, True, False, False)), ('all', (True,) * 4)]
  # no warm tier: hot+warm equals hot and is dropped; everything hot: one TierSet
  assert [t.name for t in tiersets.candidates(small_cfg('store.placement=hot,cold'))] == ['hot', 'all']
  assert [t.name for t in tiersets.candidates(small_cfg())] == ['hot']


def test_mask_reaches_every_moe_layer(setup):
  """hot only: no selection in the cold tier; all tiers: the unmasked model's loss (same arithmetic)."""
  import jax
  from litejax.train.objective import forward_loss
  cfg, model, _, rows = setup
  hot, every = rows
  assert hot['selection_fractions'] == {'hot': 1.0, 'warm': 0.0, 'cold': 0.0}
  assert 0 < every['selection_fractions']['cold'] < 1
  x, y = tiersets.val_batches(cfg, 1, 2)[0]
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  ce, _ = jax.jit(lambda p, e: forward_loss(graphdef, p, e, x, y))(params, extra)
  assert every['val_loss'] == pytest.approx(float(ce), rel=1e-6)
  assert hot['val_loss'] != pytest.approx(every['val_loss'], rel=1e-6)


def test_io_term_and_choice():
  fr = {'hot': 0.5, 'warm': 0.25, 'cold': 0.25}
  # 8 selections x 1,000 B: 2 warm (one copy each), 2 cold (a disk read and a copy each)
  assert tiersets.io_ms_per_step(fr, 8, 1000, BW) == pytest.approx(1e3 * (2e3 / 1e9 + 2e3 * (1e-8 + 1e-9)))
  # per-expert operation times dominate when they exceed bytes / bandwidth
  ops = {**BW, 'disk_read_s': 1e-3, 'slot_load_s': 1e-4}
  assert tiersets.io_ms_per_step(fr, 8, 1000, ops) == pytest.approx(1e3 * (2 * 1e-4 + 2 * (1e-3 + 1e-4)))
  rows = tiersets.predict([{'name': 'hot', 'val_loss': 2.0, 'selection_fractions': {'hot': 1.0, 'warm': 0, 'cold': 0}},
                           {'name': 'all', 'val_loss': 1.5, 'selection_fractions': fr}], 1.0, 8, 10 ** 6, BW)
  assert rows[0]['predicted_ms_per_token'] == 1.0 and rows[1]['predicted_ms_per_token'] > 1.0
  assert tiersets.choose(rows, 1e3)['name'] == 'all'          # both fit: least val loss
  assert tiersets.choose(rows, 1.5)['name'] == 'hot'          # only hot fits
  with pytest.raises(ValueError, match=r'no TierSet fits 0.5 ms .* smallest predicted latency is 1.000 ms'):
    tiersets.choose(rows, 0.5)


def test_decode_with_hot_tierset_reads_nothing(setup):
  cfg, model, store, _ = setup
  device, host = tiersets.placement_fractions(cfg)
  tiers = ExpertLevels(store, LevelOptions(device, host, 'lru', 1), load_width=8)
  try:
    tiers.preload(store.layers[0], tiersets.tier_experts(cfg, 'hot'))
    tiers.preload(store.layers[1], tiersets.tier_experts(cfg, 'hot'))
    gen, _ = StoreRuntime(cfg, model, tiers, (True, False)).generate([[1, 2, 3]], 4)
  finally:
    tiers.close()
  rep = tiers.report(4)
  assert rep['hit_rate']['device'] == 1.0 and rep['disk_reads'] == 0 and rep['device_loads'] == 0
  assert rep['lookahead_recall'][0] is not None and len(gen.tokens[0]) == 4


def test_step_cost_prices_the_programs_run(setup):
  """store/step_cost: one decode step's calls as the runtime makes them, each program priced by
  latency.estimate_compiled, plus per-call and per-round-trip costs."""
  from litejax.perf import chips as hardware, latency
  from litejax.inference import step_latency as step_cost
  cfg, model, store, _ = setup
  tiers = ExpertLevels(store, LevelOptions(0.5, 0.5, 'lru', 1), load_width=8)
  try:
    rec = step_cost.record_step(StoreRuntime(cfg, model, tiers), [[1, 2, 3]])
  finally:
    tiers.close()
  calls = rec.calls
  layers = cfg.model.num_moe_layers
  assert [c.name for c in calls] == (['_embed'] + ['moe_pre', 'experts', 'finish', 'lookahead'] * (layers - 1)
                                     + ['moe_pre', 'experts', 'finish', '_head', '_sample'])
  chip = hardware.cpu_chip(1e11, 1e10)
  got = step_cost.price(rec, chip, call_overhead_s=1e-4)
  assert got['calls'] == len(calls) and got['syncs'] == 2 * layers
  one = calls[1]
  want = latency.estimate_compiled(one.fn.lower(*one.args, **one.kwargs).compile(), chip)['total_s']
  assert got['per_program']['moe_pre'] == {'calls': layers, 'programs_ms': pytest.approx(1e3 * layers * want),
                                          'dispatch_ms': pytest.approx(0.1 * layers)}
  assert got['compute_ms'] == pytest.approx(got['programs_ms'] + len(calls) * 0.1 + 1e3 * rec.host_s)
  assert rec.host_s > 0
  probed = step_cost.price(rec, chip)     # no calibrated call overhead: a do-nothing probe per call
  assert 0 < probed['dispatch_ms'] and probed['dispatch_source'] == 'dispatch_probe_s per call'


@pytest.mark.slow
def test_generate_latency_budget_cli(tmp_path, capsys):
  """--latency-budget-ms on an --init store: the `tierset` JSON; a budget nothing fits is a clear error."""
  from litejax.cli import main
  from litejax.inference.store.writer import write_random
  write_random(str(tmp_path / 'store'), small_cfg(), 0)
  base = ['generate', '--store', str(tmp_path / 'store'), '--prompt', 'In',
          '--max-new-tokens', '3', '--val-batches', '1', '--json'] + [a for s in SMALL_TRAIN for a in ('--set', s)]
  assert main(base + ['--latency-budget-ms', '1e6']) == 0
  t = json.loads(capsys.readouterr().out)['tierset']
  assert t['chosen'] in ('hot', 'all') and [r['name'] for r in t['considered']] == ['hot', 'all']
  for r in t['considered']:
    assert r['predicted_ms_per_token'] == pytest.approx(r['compute_ms'] + r['io_ms']) and np.isfinite(r['val_loss'])
  assert t['considered'][0]['io_ms'] == 0 and t['considered'][1]['io_ms'] > 0
  assert t['measured_ms_per_token'] > 0 and t['io_probes']['disk_method'] in ('o_direct', 'fadvise_dontneed',
                                                                             'page_cache')
  assert main(base + ['--latency-budget-ms', '1e-6']) == 2
  assert 'no TierSet fits' in capsys.readouterr().err


@pytest.mark.slow
def test_lookahead_recall_quick(tmp_path, tmp_path_factory):
  """experiments/lookahead_recall.py --quick: recall per depth for both proxies; the recorded routing is
  reproduced exactly by the layer's own router on its recorded input (depth 0)."""
  import subprocess
  import sys

  import tiers_quick
  ckpt = tiers_quick.checkpoint(tmp_path_factory)   # the shrunk tiny_1k the other tiers --quick runs share
  subprocess.run([sys.executable, 'experiments/lookahead_recall.py', '--quick', '--out', str(tmp_path), '--ckpt-dir',
                  str(ckpt)], check=True, env=tiers_quick.env())
  rep = json.loads((tmp_path / 'lookahead_recall.json').read_text())
  assert rep['self_check_depth0'] == 1.0
  for proxy in ('after_attn', 'after_moe'):
    assert all(0 <= r <= 1 for r in rep['recall'][proxy]['expert'])
  # width 1 is the router's own pick: the after_moe expert recall; wider never recalls less here
  widths = {w['width']: w for w in rep['width']}
  assert widths[1]['expert_recall'] == pytest.approx(rep['recall']['after_moe']['expert'])
  assert all(a <= b for a, b in zip(widths[1]['expert_recall'], widths[32]['expert_recall']))
  assert widths[32]['wasted_experts_per_token'][0] >= widths[1]['wasted_experts_per_token'][0]
