"""Decoding a pre-gated model (moe.pregate = D): resident, and from the expert store with its exact prefetch. With
--miss stall tokens and logits are bit-identical to resident decoding; the store fetches exactly the experts
each layer uses, D MoE layers ahead (recall 1.0 at every depth, measured; no wasted prefetch read); no host
round trip stands between a pre-gated layer's attention and its experts."""
import numpy as np
import pytest
from flax import nnx

from litejax.inference.step_latency import Recorder
from litejax.inference.store.levels import ExpertLevels, LevelOptions
from litejax.inference.store_decode import StoreRuntime
from litejax.inference.store_programs import build_programs
from litejax.inference.decode import decode_config
from litejax.model.transformer import abstract_model, init_model
from store_helpers import resident, small_cfg, write_model_store
from train_helpers import enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
NEW = 5


@pytest.fixture(scope='module', params=[(2, 1), (3, 2)], ids=['2-layers-D1', '3-layers-D2'])
def pregated(request, tmp_path_factory):
  """(cfg, model, store, resident tokens, resident logits, one program set for every runtime of the model)."""
  layers, depth = request.param
  cfg = small_cfg(f'model.num_layers={layers}', f'moe.pregate={depth}')
  model = init_model(cfg, seed=1)
  store = write_model_store(cfg, model, tmp_path_factory.mktemp('store'))
  return cfg, model, store, *resident(cfg, model, PROMPTS, NEW), build_programs()


def decode(pregated, opts, hooks=None):
  cfg, model, store, *_, programs = pregated
  tiers = ExpertLevels(store, opts, load_width=8)
  try:
    gen, logits = StoreRuntime(cfg, model, tiers, programs=programs).generate(PROMPTS, NEW, keep_logits=True,
                                                                               hooks=hooks)
  finally:
    tiers.close()
  return gen, logits, tiers.report(NEW * len(PROMPTS))


def test_resident_decoding_equals_the_full_forward(pregated):
  """The cached decode carries the router inputs down the layers as the full forward does (both dropless)."""
  cfg, model, _, tokens, logits = pregated[:5]
  dropless = nnx.merge(nnx.split(abstract_model(decode_config(cfg)))[0], nnx.state(model))
  seq = [p + list(t[:-1]) for p, t in zip(PROMPTS, tokens)]      # each prompt and the tokens fed after it
  width = max(len(s) for s in seq)
  full = np.asarray(nnx.jit(lambda m, t: m(t)[0])(dropless, np.asarray([s + [0] * (width - len(s)) for s in seq])))
  for b, p in enumerate(PROMPTS):
    want = np.stack([full[b, len(p) - 1 + j] for j in range(NEW)])
    np.testing.assert_allclose(np.stack([l[b] for l in logits]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('opts', [LevelOptions(0.25, 0.5, 'lru', 0), LevelOptions(0.125, 0.25, 'group', 0),
                                  LevelOptions(0.25, 0.25, 'lfu', 0, stage=False)], ids=['lru', 'group', 'lfu-no-stage'])
def test_stall_is_bit_identical_and_fetches_exactly(pregated, opts):
  cfg, _, _, tokens, ref_logits = pregated[:5]
  gen, logits, rep = decode(pregated, opts)
  assert np.array_equal(np.asarray(gen.tokens), tokens)
  for step, (a, b) in enumerate(zip(logits, ref_logits)):
    assert np.array_equal(a, b), f'step {step}: max |diff| {np.abs(a - b).max()}'
  depth = cfg.moe.pregate
  assert rep['pregate'] == depth and rep['lookahead'] == 0
  assert rep['lookahead_recall'] == [1.0] * depth              # measured: |prefetched ∩ used| / |used|
  assert rep['prefetch_wasted_reads'] == 0 and rep['prefetch_wasted_bytes_per_token'] == 0
  assert rep['prefetch_reads'] > 0 and rep['misses']['device'] > 0        # the slots really were too few
  assert sum(rep['hit_rate'].values()) == pytest.approx(1.0)
  assert rep['io_wait_ms_per_token'] <= rep['stall_ms_per_token']
  assert set(rep['device_hit_rate_per_layer']) == set(pregated[2].layers)


def test_exact_prefetch_stages_every_expert_and_pins_them_in_the_host_level(pregated):
  """prefetch(exact=True): every expert of the layer (up to its slots, not half) staged, the prediction
  counted at each depth up to D; with staging off the host level keeps them against other layers'
  demand reads (lfu would evict them first: they have no use yet) until their layer has run."""
  store, depth = pregated[2], pregated[0].moe.pregate
  first, target = store.layers[0], store.layers[-1]
  tiers = ExpertLevels(store, LevelOptions(0.25, 0.25, 'lfu', 0), load_width=8)     # 4 slots, 4 host experts/layer
  try:
    tiers.expect_exact(depth)
    tiers.prefetch(target, [3, 5, 6, 9], depth, exact=True)
    tiers.drain()
    assert tiers.counters.staged == 4 and all(tiers.caches[target].slot_of[e] >= 0 for e in (3, 5, 6, 9))
    tiers.resolve(target, [3, 5, 6, 9])
    tiers.end_step()
    rep = tiers.report(1)
    assert rep['hit_rate']['device'] == 1.0 and rep['lookahead_recall'] == [1.0] * depth
    assert rep['staged_hits'] == 4 and rep['prefetch_wasted_reads'] == 0
  finally:
    tiers.close()
  host = tiers.host.capacity
  tiers = ExpertLevels(store, LevelOptions(0.25, 0.25, 'lfu', 0, stage=False), load_width=8)
  try:
    tiers.expect_exact(depth)
    tiers.prefetch(target, [1, 2], depth, exact=True)
    tiers.drain()
    for start in range(0, host, 4):     # demand reads of more experts than the host level holds
      tiers.resolve(first, list(range(start, start + 4)))
    tiers.resolve(target, [1, 2])
    c = tiers.counters
    assert (c.host_hits, c.disk_demand) == (2, host)
  finally:
    tiers.close()


def test_no_round_trip_between_a_pregated_layer_and_its_experts(pregated):
  """In a decode step the host waits only for the first D MoE layers' own routing, for each `pregate` (the
  ids of the layer D ahead, read at once so that their reads start early) and for the sample: a pre-gated
  layer's experts are dispatched after its attention with no wait for its own routing."""
  cfg = pregated[0]
  rec = Recorder()
  decode(pregated, LevelOptions(0.25, 0.5, 'lru', 0), hooks=rec)
  step = [i for i, c in enumerate(rec.calls) if c.name == '_embed'][-1]
  calls = rec.calls[step:]
  events = sorted([(c.t_start, c.name) for c in calls] + [(t, 'wait') for t, _ in rec.waits if t >= calls[0].t_start])
  names = [n for _, n in events]
  layers, depth = cfg.model.num_layers, cfg.moe.pregate
  assert names.count('moe_pre') == depth and names.count('moe_attend') == layers - depth
  assert names.count('pregate') == layers - depth
  assert names.count('wait') == depth + (layers - depth) + 1
  for i, n in enumerate(names):
    if n == 'moe_attend':     # no wait of its own before its experts: its ids were read D layers before
      rest = names[i + 1:]
      assert rest[:3] == ['pregate', 'wait', 'experts'] or rest[0] == 'experts', names
    if n == 'pregate':        # the layer D ahead's ids, read before this layer's experts go
      assert names[i + 1:i + 3] == ['wait', 'experts'], names


def test_generate_store_refuses_lookahead_for_a_pregated_model(tmp_path, capsys):
  """`litejax generate --store` on an --init store of a pre-gated config with `--lookahead`: one line naming
  the flag and moe.pregate, exit 2, before anything is decoded (the store JSON's keys: the runtime's
  report above and tests/test_tiered_decode.py's command test)."""
  from litejax.cli import main
  from litejax.inference.store.writer import write_random
  write_random(str(tmp_path / 'store'), small_cfg('moe.pregate=1'), 0)
  assert main(['generate', '--store', str(tmp_path / 'store'), '--prompt', 'In the', '--max-new-tokens', '3',
               '--lookahead', '1']) == 2
  err = capsys.readouterr().err
  assert '--lookahead' in err and 'moe.pregate=1' in err and len(err.strip().splitlines()) == 1
