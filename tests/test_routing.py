"""Router against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from litejax.config import from_dict
from litejax.model.moe.routing import route as route_eager, update_selection_bias

# One compile per (config, shapes) instead of eager op-by-op dispatch.
route = jax.jit(route_eager, static_argnums=(2,))


def make(T, G, Eg, kt, kg, ke, d=16, n=24, seed=0, score='softmax', renormalize=True, **variants):
  cfg = from_dict({'moe': dict(num_tiers=T, groups_per_tier=G, experts_per_group=Eg, k_tier=kt, k_group=kg,
                               k_expert=ke, score=score, renormalize=renormalize, **variants)}).moe
  rng = np.random.default_rng(seed)
  params = {'expert': rng.normal(size=(T * G, d, Eg)).astype(np.float32)}
  if T > 1:
    params['tier'] = rng.normal(size=(d, T)).astype(np.float32)
  if G > 1 and cfg.group_score == 'router':
    params['group'] = rng.normal(size=(T, d, G)).astype(np.float32)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return cfg, params, x


def test_flat_routing_is_softmax_topk_renormalise():
  cfg, params, x = make(1, 1, 8, 1, 1, 2)
  r = route(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, cfg)
  probs = ref.softmax(x.astype(np.float64) @ params['expert'][0])
  idx = np.argsort(-probs, axis=1)[:, :2]
  w = np.take_along_axis(probs, idx, 1)
  w /= w.sum(1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), idx)
  np.testing.assert_allclose(np.asarray(r.weight_nk), w, rtol=1e-5, atol=1e-6)
  assert r.expert_nk.shape == (24, 2)


@pytest.mark.parametrize('shape', [(4, 3, 5, 2, 2, 2), (3, 4, 6, 1, 3, 2), (2, 2, 4, 2, 2, 4), (1, 4, 8, 1, 2, 3),
                                   (5, 1, 6, 3, 1, 2)])
@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
def test_hierarchical_matches_numpy(shape, score):
  T, G, Eg, kt, kg, ke = shape
  for renorm in (True, False):
    cfg, params, x = make(T, G, Eg, kt, kg, ke, score=score, renormalize=renorm, seed=sum(shape))
    r = route(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, cfg)
    e_ref, w_ref = ref.hierarchical_route(x, params, T, G, Eg, kt, kg, ke, score, renorm)
    np.testing.assert_array_equal(np.asarray(r.expert_nk), e_ref)
    np.testing.assert_allclose(np.asarray(r.weight_nk), w_ref, rtol=1e-5, atol=1e-6)
    K = kt * kg * ke
    ex = np.asarray(r.expert_nk)
    assert ex.shape == (x.shape[0], K)
    assert all(len(set(row)) == K for row in ex), 'K distinct experts per token'
    # each expert sits inside its (kept) group and tier
    np.testing.assert_array_equal(ex // Eg, np.asarray(r.group_nk))
    np.testing.assert_array_equal(ex // (G * Eg), np.asarray(r.tier_nk))
    assert len({(i, t) for i, row in enumerate(np.asarray(r.tier_nk)) for t in row}) == x.shape[0] * kt
    counts = np.bincount(ex.reshape(-1), minlength=T * G * Eg)
    np.testing.assert_array_equal(np.asarray(r.tokens_per_expert), counts)


@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
def test_tier_mask_matches_numpy(score):
  """A TierSet: masked tiers are never chosen, and the tier gate is the score over the allowed ones."""
  T, G, Eg, kt, kg, ke = 4, 3, 5, 2, 2, 2
  cfg, params, x = make(T, G, Eg, kt, kg, ke, score=score, seed=7)
  jp = {k: jnp.asarray(v) for k, v in params.items()}
  unmasked = np.asarray(route(jnp.asarray(x), jp, cfg).tier_nk)
  for mask in ([True, False, True, False], [False, True, True, True], [True] * 4):
    r = route(jnp.asarray(x), jp, cfg, None, tier_mask=jnp.asarray(mask))
    e_ref, w_ref = ref.hierarchical_route(x, params, T, G, Eg, kt, kg, ke, score, tier_mask=np.array(mask))
    np.testing.assert_array_equal(np.asarray(r.expert_nk), e_ref)
    np.testing.assert_allclose(np.asarray(r.weight_nk), w_ref, rtol=1e-5, atol=1e-6)
    assert np.isin(np.asarray(r.tier_nk), np.flatnonzero(mask)).all()
  assert not np.isin(unmasked, [0, 2]).all(), 'the mask changed the choice'
  with pytest.raises(ValueError, match='tier_mask: allows 1 tiers, fewer than moe.k_tier=2'):
    route_eager(jnp.asarray(x), jp, cfg, None, tier_mask=np.array([True, False, False, False]))
  with pytest.raises(ValueError, match=r'tier_mask: must be bool \[num_tiers=4\]'):
    route_eager(jnp.asarray(x), jp, cfg, None, tier_mask=np.array([True, True]))


def test_only_kept_branches_are_scored():
  """With many tiers, the group router of an unkept tier cannot influence routing."""
  cfg, params, x = make(4, 3, 5, 1, 2, 2)
  r1 = route(jnp.asarray(x[:1]), {k: jnp.asarray(v) for k, v in params.items()}, cfg)
  kept_tier = int(r1.tier_nk[0, 0])
  other = (kept_tier + 1) % 4
  params2 = dict(params)
  params2['group'] = params['group'].copy()
  params2['group'][other] = 1e6       # absurd weights in an unkept tier
  r2 = route(jnp.asarray(x[:1]), {k: jnp.asarray(v) for k, v in params2.items()}, cfg)
  np.testing.assert_array_equal(np.asarray(r1.expert_nk), np.asarray(r2.expert_nk))


def test_router_flops_are_only_kept_branches():
  """Compiled router FLOPs grow with k_tier·G, not with T·G (only kept tiers' groups are scored)."""
  def flops(T):
    cfg, params, x = make(T, 8, 4, 1, 1, 1, d=32, n=64)
    f = jax.jit(lambda x, p: route_eager(x, p, cfg).weight_nk)
    ca = f.lower(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}).compile().cost_analysis()
    return ca['flops']
  small, big = flops(4), flops(64)
  # tier scoring grows 2·d·T per token: (64-4)·2·32·64 tokens = 245,760 FLOPs; group/expert levels fixed.
  assert big - small < 1.6 * 2 * 32 * 60 * 64


def test_load_balance_and_z_loss_on_tied_logits():
  """Zero logits: ties go to branch 0 at every level, probabilities are uniform over scored siblings.

  tier: f=[1,0], P=[1/2,1/2] -> 2·1/2 = 1; group: f on group 0, P=1/2 on tier 0's two groups -> 4·1/2 = 2;
  expert: f on expert 0, P=1/4 on group 0's four experts -> 16·1/4 = 4. z: lse² summed over levels.
  """
  cfg, params, x = make(2, 2, 4, 1, 1, 1)
  zero = {k: jnp.zeros(v.shape) for k, v in params.items()}
  r = route(jnp.asarray(x), zero, cfg)
  np.testing.assert_allclose(np.asarray(r.load_balance_loss), [1.0, 2.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose(float(r.z_loss), 2 * np.log(2) ** 2 + np.log(4) ** 2, rtol=1e-5)


def test_load_balance_loss_matches_numpy_definition():
  cfg, params, x = make(1, 1, 8, 1, 1, 2, n=64)
  r = route(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, cfg)
  probs = ref.softmax(x.astype(np.float64) @ params['expert'][0])
  idx = np.argsort(-probs, axis=1)[:, :2]
  f = np.bincount(idx.reshape(-1), minlength=8) / idx.size
  p = probs.mean(0)
  np.testing.assert_allclose(float(r.load_balance_loss[2]), 8 * np.sum(f * p), rtol=1e-5)
  assert float(r.load_balance_loss[0]) == 0 and float(r.load_balance_loss[1]) == 0


def test_selection_bias_changes_choice_not_gate():
  cfg, params, x = make(1, 1, 8, 1, 1, 1, score='sigmoid', renormalize=False)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  bias = jnp.zeros((8,)).at[5].set(100.0)
  r = route(jnp.asarray(x), p, cfg, {'expert': bias, 'tier': jnp.zeros(1), 'group': jnp.zeros(1)})
  assert (np.asarray(r.expert_nk) == 5).all()
  np.testing.assert_allclose(np.asarray(r.weight_nk)[:, 0], ref.sigmoid(x.astype(np.float64) @ params['expert'][0][:, 5]),
                             rtol=1e-5)
  new = update_selection_bias(jnp.zeros(4), jnp.array([4, 0, 2, 2]), 0.1)
  np.testing.assert_allclose(np.asarray(new), [-0.1, 0.1, 0.0, 0.0])


@pytest.mark.parametrize('k', [1, 3, 16, 17, 40])   # <= 16: argmax rounds; above: the sort fallback
def test_top_k_matches_numpy_with_ties(k):
  from litejax.model.moe.routing import top_k
  rng = np.random.default_rng(k)
  x = np.round(rng.normal(size=(2, 7, 48)) * 2) / 2          # many exact ties
  vals, idx = jax.jit(top_k, static_argnums=1)(jnp.asarray(x, jnp.float32), k)
  ref_idx = np.stack([[ref.topk(row, k) for row in mat] for mat in x])
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(x, ref_idx, -1).astype(np.float32))


def test_routing_partitions_over_batch_without_gathering_tokens():
  """Under a batch-sharded jit every rank routes only its own tokens: no collective moves scores."""
  from jax.sharding import NamedSharding
  from litejax.config import MeshConfig
  from litejax.sharding import logical_to_spec, make_mesh
  cfg, params, x = make(2, 2, 8, 1, 2, 2, n=64)
  mesh = make_mesh(MeshConfig(data=8))
  x_sharded = jax.device_put(jnp.asarray(x), NamedSharding(mesh, logical_to_spec(('batch', None))))
  fn = jax.jit(lambda x, p: (lambda r: (r.expert_nk, r.weight_nk))(route_eager(x, p, cfg)))
  hlo = fn.lower(x_sharded, {k: jnp.asarray(v) for k, v in params.items()}).compile().as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo
  e_ref, _ = ref.hierarchical_route(x, params, 2, 2, 8, 1, 2, 2)
  np.testing.assert_array_equal(np.asarray(fn(x_sharded, {k: jnp.asarray(v) for k, v in params.items()})[0]), e_ref)


# DeepSeek-V3's group-limited routing: (T, G, E_g, k_tier, k_group, k_expert), expert counts that are not
# powers of two and k_group < G, k_expert pooled over the kept groups (more than one group's worth), with
# (selection, group_score, score, renormalize, routed_scale).
VARIANT_CASES = [
    ((1, 4, 3, 1, 2, 4), 'pooled', 'top2_experts', 'sigmoid', True, 2.5),      # DeepSeek-V3 in miniature
    ((1, 5, 4, 1, 3, 5), 'pooled', 'top2_experts', 'sigmoid', False, 1.0),
    ((3, 2, 5, 2, 1, 3), 'pooled', 'router', 'sigmoid', True, 1.0),
    ((2, 3, 3, 2, 2, 5), 'pooled', 'router', 'softmax', True, 2.5),
    ((2, 3, 3, 2, 2, 2), 'per_group', 'top2_experts', 'sigmoid', True, 1.5),
]


@pytest.mark.parametrize('shape, selection, group_score, score, renorm, scale', VARIANT_CASES)
def test_group_limited_variants_match_numpy(shape, selection, group_score, score, renorm, scale):
  T, G, Eg, kt, kg, ke = shape
  rng = np.random.default_rng(sum(shape))
  bias = None
  if score == 'sigmoid':   # selection biases large enough to move choices
    bias = {'tier': rng.normal(size=T) * 0.3, 'group': rng.normal(size=T * G) * 0.3,
            'expert': rng.normal(size=T * G * Eg) * 0.3}
  cfg, params, x = make(T, G, Eg, kt, kg, ke, score=score, renormalize=renorm, seed=sum(shape),
                        expert_selection=selection, group_score=group_score, routed_scale=scale)
  jb = None if bias is None else {k: jnp.asarray(v, jnp.float32) for k, v in bias.items()}
  r = route(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, cfg, jb)
  e_ref, w_ref = ref.hierarchical_route(x, params, T, G, Eg, kt, kg, ke, score, renorm, bias=bias,
                                        selection=selection, group_score=group_score, routed_scale=scale)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), e_ref)
  np.testing.assert_allclose(np.asarray(r.weight_nk), w_ref, rtol=1e-5, atol=1e-6)
  ex = np.asarray(r.expert_nk)
  assert ex.shape == (x.shape[0], cfg.k_active) and all(len(set(row)) == cfg.k_active for row in ex)
  np.testing.assert_array_equal(ex // Eg, np.asarray(r.group_nk))
  np.testing.assert_array_equal(ex // (G * Eg), np.asarray(r.tier_nk))
  np.testing.assert_array_equal(np.asarray(r.tokens_per_expert), np.bincount(ex.reshape(-1), minlength=T * G * Eg))
  assert int(np.asarray(r.tokens_per_group).sum()) == x.shape[0] * kt * kg   # selections of kept groups


def test_top2_group_score_is_the_two_best_biased_expert_scores():
  """One token, hand-set logits: group 0 holds the single best expert, group 1 the best pair, so the
  top-2 sum keeps group 1; a bias on group 0's experts turns it around (the bias moves selection only)."""
  cfg = from_dict({'moe': dict(num_tiers=1, groups_per_tier=2, experts_per_group=3, k_group=1, k_expert=2,
                               score='sigmoid', expert_selection='pooled', group_score='top2_experts',
                               renormalize=False)}).moe
  logits = np.array([[4.0, -4.0, -4.0], [1.0, 1.0, -4.0]], np.float32)      # [G, E_g]
  x = np.ones((1, 1), np.float32)
  p = {'expert': jnp.asarray(logits[:, None, :])}                           # x·w = logits
  r = route(jnp.asarray(x), p, cfg)
  assert sorted(np.asarray(r.expert_nk)[0]) == [3, 4]
  bias = {'tier': jnp.zeros(1), 'group': jnp.zeros(2), 'expert': jnp.asarray([0, 1.0, 0, 0, 0, 0], jnp.float32)}
  r = route(jnp.asarray(x), p, cfg, bias)
  assert sorted(np.asarray(r.expert_nk)[0]) == [0, 1]
  want = np.sort(ref.sigmoid(np.array([4.0, -4.0])))
  np.testing.assert_allclose(np.sort(np.asarray(r.weight_nk)[0]), want, rtol=1e-6)


def test_pooled_switch_loss_on_tied_logits():
  """Zero logits, 1 tier x 4 groups x 3 experts, keep 2 groups, pool 3 experts: ties keep groups 0, 1
  and experts 0, 1, 2 (all of group 0). f on experts 0..2 = 1/3 each; P = 1/6 on each of the 6 pooled
  experts (groups 0, 1): 12·3·(1/3·1/6) = 2."""
  cfg, params, x = make(1, 4, 3, 1, 2, 3, score='sigmoid', expert_selection='pooled', group_score='top2_experts')
  zero = {k: jnp.zeros(v.shape) for k, v in params.items()}
  r = route(jnp.asarray(x), zero, cfg)
  np.testing.assert_allclose(np.asarray(r.load_balance_loss), [0.0, 0.0, 2.0], rtol=1e-6)
  assert (np.asarray(r.expert_nk) == [0, 1, 2]).all()


def test_variant_bias_update_compares_an_expert_with_its_tier():
  from litejax.model.moe.routing import update_selection_biases
  cfg = from_dict({'moe': dict(num_tiers=1, groups_per_tier=2, experts_per_group=2, k_group=1, k_expert=2,
                               score='sigmoid', expert_selection='pooled', group_score='top2_experts')}).moe
  loads = type('Loads', (), {'tokens_per_tier': jnp.array([4]), 'tokens_per_group': jnp.array([4, 0]),
                             'tokens_per_expert': jnp.array([3, 1, 0, 0])})
  bias = {'tier': jnp.zeros(1), 'group': jnp.zeros(2), 'expert': jnp.zeros(4)}
  new = update_selection_biases(bias, loads, 0.1, cfg)
  np.testing.assert_allclose(np.asarray(new['expert']), [-0.1, 0.0, 0.1, 0.1])   # mean load 1 over all 4
  np.testing.assert_array_equal(np.asarray(new['group']), [0, 0])                # not read: unchanged


def test_variant_config_rules():
  from litejax.config import ConfigError
  base = dict(num_tiers=1, groups_per_tier=4, experts_per_group=3, k_group=2, k_expert=4, score='sigmoid')
  assert from_dict({'moe': {**base, 'expert_selection': 'pooled'}}).moe.k_active == 4
  for extra, msg in ((dict(), r'moe.k_expert \(4\) must be <= moe.experts_per_group \(3\)'),
                     (dict(expert_selection='pooled', k_expert=7), r'<= moe.k_group \* moe.experts_per_group \(6\)'),
                     (dict(expert_selection='pooled', rank_aligned_groups=True), 'moe.rank_aligned_groups'),
                     (dict(expert_selection='pooled', group_score='top2_experts', score='softmax'),
                      'needs moe.score=sigmoid'),
                     (dict(expert_selection='pooled', group_score='top2_experts', num_tiers=2),
                      'moe.k_tier == moe.num_tiers'),
                     (dict(expert_selection='pooled', routed_scale=0.0), 'moe.routed_scale: must be > 0')):
    with pytest.raises(ConfigError, match=msg):
      from_dict({'moe': {**base, **extra}})
