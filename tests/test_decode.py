"""Decoding (litejax.inference.decode): prefill + cached steps equal a full forward, on one device and on meshes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litejax.inference import decode
from litejax import jaxcompat, sharding as shd
from litejax.config import MeshConfig, load_config
from litejax.model import kv_cache
from litejax.model.transformer import init_model
from litejax.inference.sampling import Sampling
from train_helpers import REPO, TINY, enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()

S, EXTRA = 12, 4                       # tokens compared per row; cache slack for the longest prompt
LENGTHS = np.array([5, 3, 8, 5, 4, 6, 7, 3], np.int32)    # prompt length per row: 3 .. 7 (+1)
SHRINK = TINY[:5] + ['moe.d_expert=32', 'model.scan_layers=true', 'moe.experts_per_group=8']
CONFIGS = {
    'tiny_dense': ['model.scan_layers=true'] + TINY[:5],
    'tiny': SHRINK,
    'tiny_hier': TINY[:5] + ['moe.d_expert=32', 'model.scan_layers=true'],
}


def config(name, extra=()):
  return load_config(REPO / 'configs' / f'{name}.yaml', CONFIGS[name] + list(extra))


def mesh_of(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return shd.make_mesh(MeshConfig(*shape), devices)


@functools.lru_cache(maxsize=None)
def reference(name):
  """(params, extra, tokens [8, S], full-forward logits [8, S, V]) on one device, dropless routing."""
  cfg = decode.decode_config(config(name))
  model = init_model(cfg, seed=1)
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, S)).astype(np.int32)
  logits, _ = jax.jit(lambda p, e, t: nnx.merge(graphdef, p, e)(t))(params, extra, tokens)
  return params, extra, tokens, np.asarray(logits)


@functools.lru_cache(maxsize=None)
def runtime(name, shape, max_len=S + EXTRA):
  """One Runtime (so one compile of prefill and step) per config and mesh, shared by the tests."""
  return decode.make_runtime(config(name), mesh_of(shape), 8, max_len)


def cached_logits(rt, params, extra, tokens):
  """Logits at every position of every row from prefill (each row its own prompt length, padded)
  followed by teacher-forced decode steps; and the decode step's compile count."""
  cfg, mesh = rt.cfg, rt.mesh
  params, extra = rt.place(params, extra)
  padded = np.where(np.arange(LENGTHS.max())[None] < LENGTHS[:, None], tokens[:, :LENGTHS.max()], 0)
  key, samp = rt.replicated((jax.random.key(0), Sampling().as_arrays()))
  with jax.set_mesh(mesh):
    cache = kv_cache.init_cache(cfg, mesh, 8, S + EXTRA)
    _, logits_p, cache = rt.prefill(params, extra, cache, padded, rt.rows(LENGTHS), key, samp)
    got = np.full((8, S, cfg.model.vocab_size), np.nan, np.float32)
    logits_p = np.asarray(logits_p)
    for b, n in enumerate(LENGTHS):
      got[b, :n] = logits_p[b, :n]
    for j in range(S - LENGTHS.min()):
      pos = LENGTHS + j
      feed = np.where(pos < S, tokens[np.arange(8), np.minimum(pos, S - 1)], 0).astype(np.int32)
      _, logits_b, cache = rt.step(params, extra, cache, rt.rows(feed), rt.rows(pos), key,
                                   rt.replicated(jnp.int32(j)), samp)
      logits_b = np.asarray(logits_b)
      for b in np.flatnonzero(pos < S):
        got[b, pos[b]] = logits_b[b]
  return got, jaxcompat.compiled_variants(rt.step)


def check(name, shape):
  params, extra, tokens, want = reference(name)
  got, compiles = cached_logits(runtime(name, shape), params, extra, tokens)
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert compiles == 1


@pytest.mark.parametrize('name', list(CONFIGS))
def test_cached_equals_full_forward_one_device(name):
  check(name, (1, 1, 1))


def test_cached_equals_full_forward_2x2x2():
  check('tiny', (2, 2, 2))


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1)])
def test_cached_equals_full_forward_meshes(shape):
  check('tiny', shape)


@pytest.mark.slow
def test_hier_expert_parallel():
  check('tiny_hier', (2, 2, 2))


def test_cached_differs_when_the_cache_is_wrong():
  # The comparison can fail: shifting the positions by one changes RoPE and the logits.
  params, extra, tokens, want = reference('tiny')
  rt = runtime('tiny', (1, 1, 1))
  cfg = rt.cfg
  params, extra = rt.place(params, extra)
  key, step, samp = rt.replicated((jax.random.key(0), jnp.int32(0), Sampling().as_arrays()))
  with jax.set_mesh(rt.mesh):
    cache = kv_cache.init_cache(cfg, rt.mesh, 8, S + EXTRA)
    _, _, cache = rt.prefill(params, extra, cache, tokens[:, :8], rt.rows(np.full(8, 4)), key, samp)
    _, logits_b, _ = rt.step(params, extra, cache, rt.rows(tokens[:, 4]), rt.rows(np.full(8, 5)), key, step, samp)
  assert np.abs(np.asarray(logits_b) - want[:, 4]).max() > 1e-3


@pytest.fixture(scope='module')
def tiny_runtime():
  params, extra, _, _ = reference('tiny')
  return runtime('tiny', (1, 1, 1)), params, extra


PROMPTS = [[72, 101, 108, 108, 111], [87, 104], [65, 110, 100, 32, 71, 111, 100]]


def test_greedy_batch_equals_one_by_one_and_is_deterministic(tiny_runtime):
  rt, params, extra = tiny_runtime
  with jax.set_mesh(rt.mesh):
    batch = decode.generate(rt, params, extra, PROMPTS, 8)
    again = decode.generate(rt, params, extra, PROMPTS, 8)
    alone = [decode.generate(rt, params, extra, [p], 8).tokens[0] for p in PROMPTS]
  assert batch.tokens == again.tokens == alone
  assert [len(t) for t in batch.tokens] == [8] * 3
  assert batch.compiles == 1 and len(batch.step_s) == 7 and not batch.interrupted


def test_seed_reproduces_a_sample(tiny_runtime):
  rt, params, extra = tiny_runtime
  s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
  with jax.set_mesh(rt.mesh):
    a = decode.generate(rt, params, extra, PROMPTS, 8, s, seed=3).tokens
    b = decode.generate(rt, params, extra, PROMPTS, 8, s, seed=3).tokens
    c = decode.generate(rt, params, extra, PROMPTS, 8, s, seed=4).tokens
    greedy = decode.generate(rt, params, extra, PROMPTS, 8).tokens
  assert a == b and a != c and a != greedy
  assert jaxcompat.compiled_variants(rt.step) == 1        # sampling settings are traced: no recompile


def test_ctrl_c_returns_what_was_generated(tiny_runtime):
  rt, params, extra = tiny_runtime

  def stop_at_three(out):
    if len(out[0]) == 3:
      raise KeyboardInterrupt

  with jax.set_mesh(rt.mesh):
    g = decode.generate(rt, params, extra, PROMPTS, 8, on_step=stop_at_three)
  assert g.interrupted and [len(t) for t in g.tokens] == [3, 3, 3]


def test_bad_arguments_are_named(tiny_runtime):
  rt, params, extra = tiny_runtime
  with pytest.raises(ValueError, match='max_new_tokens'):
    decode.generate(rt, params, extra, PROMPTS, 0)
  with pytest.raises(ValueError, match='cache length'):
    decode.generate(rt, params, extra, PROMPTS, S + EXTRA)
  with pytest.raises(ValueError, match='top_p'):
    decode.generate(rt, params, extra, PROMPTS, 2, Sampling(top_p=0.0))


def test_bf16_runs():
  cfg = config('tiny', ['model.dtype=bfloat16', 'model.param_dtype=bfloat16'])
  mesh = mesh_of((1, 1, 1))
  rt = decode.make_runtime(cfg, mesh, 8, 16)
  _, params, extra = nnx.split(init_model(cfg), nnx.Param, ...)
  with jax.set_mesh(mesh):
    g = decode.generate(rt, params, extra, PROMPTS, 4)
  assert rt.cache_shardings[0]['k'] is not None
  assert all(len(t) == 4 and all(0 <= x < 256 for x in t) for t in g.tokens)


def test_cache_layout_follows_the_logical_rules():
  cfg = config('tiny')
  sh = kv_cache.cache_shardings(cfg, mesh_of((2, 2, 2)), 8, 16)
  spec = sh[0]['k'].spec                    # scanned: [periods, B, T, KV, hd]
  assert tuple(spec) == (None, ('data', 'expert'), None, 'tensor', None)


def test_routing_ids_match_the_router():
  # make_runtime(with_routing=True): each token's experts per MoE layer, equal to the router's choice
  # on that layer's input in a full forward (the default runtime returns no ids).
  from litejax.model.moe import routing
  cfg = config('tiny', ['model.scan_layers=false'])
  mesh = mesh_of((1, 1, 1))
  rt = decode.make_runtime(cfg, mesh, 8, 16, with_routing=True)
  model = init_model(decode.decode_config(cfg), seed=1)
  _, params, extra = nnx.split(model, nnx.Param, ...)
  prompt = PROMPTS[0]
  with jax.set_mesh(mesh):
    g = decode.generate(rt, params, extra, [prompt], 4)
  assert len(g.experts) == 4 and g.experts[0].shape == (cfg.model.num_moe_layers, 1, cfg.moe.k_active)
  # Reference: the router on each block's ffn input over prompt + generated tokens (full forward).
  seq = np.asarray([prompt + g.tokens[0][:-1]], np.int32)
  x = model.embed[...][seq]
  want = []
  for block in model.blocks:
    positions = jnp.arange(seq.shape[1])[None]
    x = x + block.attn(block.attn_norm(x), positions)
    h = block.ffn_norm(x)
    r = routing.route(h.reshape(-1, h.shape[-1]), block.ffn.router_params(), block.ffn.moe_cfg)
    want.append(np.asarray(r.expert_nk))
    x = x + block.ffn(h)[0]
  want = np.stack(want)[:, len(prompt) - 1:]                    # [L, new tokens, K]
  got = np.stack([e[:, 0] for e in g.experts], axis=1)
  np.testing.assert_array_equal(got, want)
