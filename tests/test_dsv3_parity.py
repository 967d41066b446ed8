"""DeepSeek-V3's architecture in litejax against transformers' own modules, module by module: the group-
limited router, MLA attention with YaRN (whole sequence, and prefill + cached decode), and a whole 2-layer
DeepseekV3ForCausalLM (the first layer dense). The reference numbers are tests/fixtures/dsv3/*.npz,
written by transformers itself (experiments/dsv3_fixtures.py; CI needs neither torch nor transformers)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_weights as hfw
from litejax.config import ModelConfig, from_dict
from litejax.model import kv_cache, layers, mla
from litejax.model.moe.routing import route

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'dsv3'
TOL = dict(rtol=1e-4, atol=1e-4)


def fixture(name):
  return dict(np.load(FIXTURES / f'{name}.npz'))


def by_expert(ids_nk, weights_nk):
  """Each token's (expert ids, weights) in ascending id order: transformers' top-k is unsorted."""
  order = np.argsort(ids_nk, axis=1)
  return np.take_along_axis(ids_nk, order, 1), np.take_along_axis(weights_nk, order, 1)


@pytest.mark.parametrize('name', ['router_12e_4g', 'router_15e_5g', 'router_18e_3g'])
def test_router_matches_transformers(name):
  f = fixture(name)
  hc = hfw.config(f)
  cfg = from_dict({'moe': hfw.moe_section(hc)}).moe
  g = hc['n_group']
  params = {'expert': hfw.router_weight(f['weight'], g)}
  r = jax.jit(route, static_argnums=2)(jnp.asarray(f['hidden']), params, cfg,
                                        {'expert': hfw.t(f['e_score_correction_bias'])})
  ids, w = by_expert(np.asarray(r.expert_nk), np.asarray(r.weight_nk))
  want_ids, want_w = by_expert(f['topk_indices'], f['topk_weights'])
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(w, want_w, **TOL)


def mla_module(f):
  hc = hfw.config(f)
  mc = from_dict({'model': hfw.model_section(hc)}).model
  attn = mla.MLAttention(mc, nnx.Rngs(params=0))
  hfw.assign(attn, hfw.mla_weights(f, '', hc, attn))
  return mc, attn


@pytest.mark.parametrize('name', ['mla_yarn_lora', 'mla_yarn_mscale_half', 'mla_plain'])
def test_rope_scaling_matches_transformers(name):
  """YaRN's blended frequencies, its cos/sin factor and MLA's softmax scale (mscale²), and plain RoPE's."""
  f = fixture(name)
  mc = from_dict({'model': hfw.model_section(hfw.config(f))}).model
  np.testing.assert_allclose(layers.rope_frequencies(mc, mc.qk_rope_head_dim), f['inv_freq'], rtol=1e-6)
  assert layers.rope_attention_factor(mc) == pytest.approx(float(f['attention_scaling']), rel=1e-6)
  assert mla.softmax_scale(mc) == pytest.approx(float(f['scaling']), rel=1e-6)


# One compile per (module, shapes), shared by the calls below (a jit built per call would recompile).
whole = nnx.jit(lambda m, x, p: m(x, p))
cached = nnx.jit(lambda m, x, p, a, c: m.cached(x, p, a, c))


def cached_outputs(attn, mc: ModelConfig, x, prefill: int):
  """Outputs [B, S, d] of prefill of `prefill` tokens, then one token at a time, through the latent cache."""
  b, s, _ = x.shape
  cfg = from_dict({'model': {**hfw_model_fields(mc), 'seq_len': s}})
  cache = {k: jnp.zeros(v.shape, v.dtype) for k, v in kv_cache.layer_entry(cfg, b, s).items()}
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  out, lat, kr = cached(attn, x[:, :prefill], pos[:, :prefill], cache['latent'], cache['k_rope'])
  outs = [out]
  for j in range(prefill, s):
    out, lat, kr = cached(attn, x[:, j:j + 1], pos[:, j:j + 1], lat, kr)
    outs.append(out)
  return np.asarray(jnp.concatenate(outs, axis=1))


def hfw_model_fields(mc: ModelConfig) -> dict:
  return {k: getattr(mc, k) for k in ('d_model', 'num_heads', 'num_kv_heads', 'attention', 'q_lora_rank',
                                      'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim')}


@pytest.mark.slow   # compiles the layer's whole-sequence, prefill and decode programs per fixture
@pytest.mark.parametrize('name', ['mla_yarn_lora', 'mla_yarn_mscale_half', 'mla_plain'])
def test_mla_matches_transformers(name):
  """Whole sequence (keys and values up-projected) and, through the latent cache (W_kv_b absorbed),
  prefill of transformers' length then cached decode; the first fixture also from a one-token prefill."""
  f = fixture(name)
  mc, attn = mla_module(f)
  x = jnp.asarray(f['x'])
  pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  np.testing.assert_allclose(np.asarray(whole(attn, x, pos)), f['out'], **TOL)
  np.testing.assert_allclose(cached_outputs(attn, mc, x, int(f['prefill'])), f['out_cached'], **TOL)
  if name == 'mla_yarn_lora':
    np.testing.assert_allclose(cached_outputs(attn, mc, x, 1), f['out'], **TOL)


@pytest.fixture(scope='module')
def tiny_deepseek():
  """(fixture, litejax config, the litejax model holding transformers' weights)."""
  from litejax.model.transformer import init_model
  f = fixture('model')
  hc = hfw.config(f)
  cfg = hfw.model_config(hc)
  model = init_model(cfg)
  hfw.load_model(model, f, cfg)
  return f, cfg, model


@pytest.mark.slow
def test_tiny_model_logits_and_experts_match_transformers(tiny_deepseek):
  f, cfg, model = tiny_deepseek
  logits, stats = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(f['ids']))
  np.testing.assert_allclose(np.asarray(logits), f['logits'], **TOL)
  ids = np.asarray(stats.expert_ids)                         # [MoE layers, B·S, K]
  np.testing.assert_array_equal(np.sort(ids, -1), np.sort(f['topk_indices'], -1))


@pytest.mark.slow
def test_tiny_model_generate_programs_match_transformers_cache(tiny_deepseek):
  """litejax.inference.decode's jitted prefill and decode step (what `generate` runs) over the latent
  cache, teacher-forced on the fixture's tokens, against transformers' DynamicCache decode."""
  from litejax import sharding
  from litejax.config import MeshConfig
  from litejax.inference import decode
  from litejax.inference.sampling import Sampling
  f, cfg, model = tiny_deepseek
  ids, prefill = f['ids'], int(f['prefill'])
  b, s = ids.shape
  mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  rt = decode.make_runtime(cfg, mesh, b, s)
  _, params, extra = nnx.split(model, nnx.Param, ...)
  params, extra = rt.place(params, extra)
  key, samp = rt.replicated((jax.random.key(0), Sampling().as_arrays()))
  with jax.set_mesh(mesh):
    cache = kv_cache.init_cache(cfg, mesh, b, s)
    assert set(cache[0]) == {'latent', 'k_rope'} and cache[0]['latent'].shape == (b, s, cfg.model.kv_lora_rank)
    _, logits_p, cache = rt.prefill(params, extra, cache, ids[:, :prefill], rt.rows([prefill] * b), key, samp)
    got = [np.asarray(logits_p)]
    for j in range(prefill, s):
      _, logits_b, cache = rt.step(params, extra, cache, rt.rows(ids[:, j]), rt.rows([j] * b), key,
                                   rt.replicated(jnp.int32(j)), samp)
      got.append(np.asarray(logits_b)[:, None])
  np.testing.assert_allclose(np.concatenate(got, axis=1), f['logits_cached'], **TOL)
