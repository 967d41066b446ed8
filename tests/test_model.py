"""The NNX model: shapes, causality, scan == unrolled, parameter metadata and counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litejax.model import bounds
from litejax.config import from_dict
from litejax.model.transformer import abstract_model, init_model, layer_mean

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

SMALL = {'model': dict(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=64, d_ff=48),
         'moe': dict(num_tiers=2, groups_per_tier=2, experts_per_group=2, k_tier=1, k_group=1, k_expert=2,
                     d_expert=16, capacity_factor=8.0)}


def cfg_with(**sections):
  raw = {k: dict(v) for k, v in SMALL.items()}
  for name, upd in sections.items():
    raw.setdefault(name, {}).update(upd)
  return from_dict(raw)


def forward(model, tokens):
  return nnx.jit(lambda m, t: m(t))(model, tokens)


def tokens(cfg, b=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, cfg.model.seq_len), 0, cfg.model.vocab_size)


def test_forward_shapes_and_aux():
  cfg = cfg_with()
  logits, aux = forward(init_model(cfg), tokens(cfg))
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  assert aux.tokens_per_expert.shape == (4, 8)
  assert int(aux.tokens_per_expert.sum()) == 4 * 2 * 16 * 2      # layers · tokens · K
  assert aux.tokens_per_group.shape == (4, 4) and aux.tokens_per_tier.shape == (4, 2)
  assert int(aux.tokens_per_group.sum()) == int(aux.tokens_per_tier.sum()) == 4 * 2 * 16   # k_tier = k_group = 1
  assert aux.load_balance_loss.shape == (4, 3) and aux.drop_fraction.shape == (4, 3)
  assert layer_mean(aux.load_balance_loss).shape == (3,)
  assert np.isfinite(np.asarray(logits)).all()


def test_causal():
  cfg = cfg_with()
  model = init_model(cfg)
  t = tokens(cfg, b=1)
  t2 = t.at[0, 10].set((t[0, 10] + 1) % 64)
  l1, _ = forward(model, t)
  l2, _ = forward(model, t2)
  np.testing.assert_allclose(np.asarray(l1[0, :10]), np.asarray(l2[0, :10]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(l1[0, 10:]), np.asarray(l2[0, 10:]))


@pytest.mark.parametrize('moe_every', [1, 2])
def test_scan_equals_unrolled(moe_every):
  cfg = cfg_with(model={'moe_every': moe_every})
  cfg_scan = cfg_with(model={'moe_every': moe_every, 'scan_layers': True})
  unrolled = init_model(cfg)
  scanned = init_model(cfg_scan)
  # Copy the unrolled weights into the stacked layout: period p, layer j <- block p*moe_every + j.
  period = moe_every
  for j, layer in enumerate(scanned.periods.layers):
    src = [unrolled.blocks[p * period + j] for p in range(cfg.model.num_layers // period)]
    dst_state = nnx.state(layer)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in src])
    nnx.update(layer, stacked)
    assert jax.tree.structure(dst_state) == jax.tree.structure(stacked)
  scanned.embed[...] = unrolled.embed[...]
  nnx.update(scanned.final_norm, nnx.state(unrolled.final_norm))
  t = tokens(cfg)
  l1, a1 = forward(unrolled, t)
  l2, a2 = forward(scanned, t)
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), rtol=1e-5, atol=1e-5)
  # the same stats, stacked by scan or by hand (counts exactly: rtol·count < 1)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a1, a2)


@pytest.mark.parametrize('sections', [
    {},
    {'moe': {'expert_kind': 'glu', 'num_shared_experts': 2, 'd_shared': 8}},
    {'model': {'tie_embeddings': False, 'moe_every': 2, 'ffn_kind': 'mlp'}},
    {'moe': {'num_tiers': 1, 'groups_per_tier': 1, 'experts_per_group': 8, 'score': 'sigmoid'}},
    {'model': {'scan_layers': True, 'moe_every': 2, 'head_dim': 16}},
    {'model': {'moe_every': 0}},
    # DeepSeek-V3's MLA without q's low rank, and its group-limited routing (no group router table)
    {'model': {'attention': 'mla', 'kv_lora_rank': 12, 'qk_nope_head_dim': 6, 'qk_rope_head_dim': 4, 'v_head_dim': 5,
               'scan_layers': True},
     'moe': {'num_tiers': 1, 'groups_per_tier': 4, 'experts_per_group': 2, 'k_group': 2, 'k_expert': 3,
             'score': 'sigmoid', 'expert_selection': 'pooled', 'group_score': 'top2_experts'}},
    {'model': {'qk_norm': True, 'head_dim': 6, 'dense_layers': '0,2'}},
])
def test_param_counts_match_model_and_axes_are_tagged(sections):
  cfg = cfg_with(**sections)
  model = abstract_model(cfg)
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert sum(int(np.prod(v.shape)) for v in leaves) == bounds.param_counts(cfg).total
  for v in leaves:
    axes = v.get_metadata()['logical_axes']
    assert len(v.shape) - len(axes) in (0, 1), (v.shape, axes)   # +1: the scanned 'layers' axis


def test_dense_layers_and_qk_norm_build_what_they_name():
  cfg = cfg_with(model={'qk_norm': True, 'head_dim': 6, 'dense_layers': '0-1'})
  model = abstract_model(cfg)
  assert [b.is_moe for b in model.blocks] == [False, False, True, True]
  attn = model.blocks[0].attn
  assert attn.q_norm.scale.shape == attn.k_norm.scale.shape == (6,)
  assert attn.q_norm.scale.get_metadata()['logical_axes'] == ('head_dim',)


def test_expert_weights_use_expert_axis():
  cfg = cfg_with()
  block = abstract_model(cfg).blocks[0].ffn
  assert block.w_in.get_metadata()['logical_axes'] == ('expert', 'embed', 'expert_mlp')
  assert block.w_in.shape == (8, 32, 16)


def test_bf16_compute_is_finite_and_close():
  cfg32 = cfg_with()
  cfg16 = cfg_with(model={'dtype': 'bfloat16'})
  m32 = init_model(cfg32)
  m16 = init_model(cfg16)
  t = tokens(cfg32)
  l32, _ = forward(m32, t)
  l16, _ = forward(m16, t)
  assert np.isfinite(np.asarray(l16)).all()
  assert np.abs(np.asarray(l16) - np.asarray(l32)).mean() < 0.1


def test_gradients_reach_every_parameter():
  cfg = cfg_with(moe={'num_shared_experts': 1})
  model = init_model(cfg)
  t = tokens(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    logits, aux = m(t)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]) + \
        0.01 * layer_mean(aux.load_balance_loss).sum() + 0.001 * layer_mean(aux.z_loss)

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for path, g in flat:
    assert float(jnp.abs(g).sum()) > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'
