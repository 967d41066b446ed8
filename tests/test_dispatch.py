"""Capacity, drops and every dispatch path against a dense NumPy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from litejax.config import from_dict
from litejax.model.moe.capacity import resolve_dispatch
from litejax.model.moe.dispatch import moe_ffn
from litejax.model.moe.rows import assignment_positions, drop_fractions
from litejax.model.moe.routing import route


def moe_cfg(**kw):
  base = dict(num_tiers=2, groups_per_tier=2, experts_per_group=4, k_tier=1, k_group=2, k_expert=2, d_expert=8)
  base.update(kw)
  return from_dict({'moe': base}).moe


def weights(cfg, d, seed=0):
  rng = np.random.default_rng(seed)
  E, h = cfg.experts_total, cfg.d_expert
  w = {'w_in': rng.normal(size=(E, d, h)) / np.sqrt(d), 'w_out': rng.normal(size=(E, h, d)) / np.sqrt(h)}
  if cfg.expert_kind == 'glu':
    w['w_gate'] = rng.normal(size=(E, d, h)) / np.sqrt(d)
  return {k: v.astype(np.float32) for k, v in w.items()}


def router_params(cfg, d, seed=1):
  rng = np.random.default_rng(seed)
  T, G, Eg = cfg.num_tiers, cfg.groups_per_tier, cfg.experts_per_group
  p = {'expert': rng.normal(size=(T * G, d, Eg))}
  if T > 1:
    p['tier'] = rng.normal(size=(d, T))
  if G > 1:
    p['group'] = rng.normal(size=(T, d, G))
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


@functools.partial(jax.jit, static_argnums=(3, 4))
def run(x, rp, w, cfg, path):
  r = route(x, rp, cfg)
  y, drop_fraction = moe_ffn(x, r, w, cfg, path)
  return y, r.expert_nk, r.weight_nk, drop_fraction


def test_hand_worked_capacity_and_drops():
  # 5 tokens, K = 2, 3 experts, capacity 2. Slot-major priority: first choices in token order, then seconds.
  experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0]])
  pos, keep = assignment_positions(experts, 2)
  # first choices: e0 <- t0 (0), t1 (1), t2 (2: dropped); e1 <- t3 (0); e2 <- t4 (0)
  # second choices: e1 <- t0 (1), t2 (2: dropped); e2 <- t1 (1); e0 <- t3 (3: dropped), t4 (4: dropped)
  np.testing.assert_array_equal(np.asarray(pos), [[0, 1], [1, 1], [2, 2], [0, 3], [0, 4]])
  np.testing.assert_array_equal(np.asarray(keep), [[1, 1], [1, 1], [0, 0], [1, 0], [1, 0]])
  cfg = from_dict({'moe': dict(num_tiers=1, groups_per_tier=1, experts_per_group=3, k_expert=2)}).moe
  fr = np.asarray(drop_fractions(keep, cfg))
  np.testing.assert_allclose(fr, [1 / 5, 1 / 5, 4 / 10])   # token 2 lost both: its tier/group branch dropped


def test_positions_match_numpy_on_random_routing():
  rng = np.random.default_rng(3)
  experts = rng.integers(0, 7, size=(50, 3))
  for cap in (1, 4, 9, 100):
    pos, keep = assignment_positions(jnp.asarray(experts), cap)
    pos_ref, keep_ref = ref.capacity_keep(experts, cap)
    np.testing.assert_array_equal(np.asarray(pos), pos_ref)
    np.testing.assert_array_equal(np.asarray(keep), keep_ref)


@pytest.mark.parametrize('kind', ['mlp', 'glu'])
@pytest.mark.parametrize('path', ['capacity', 'gather', 'einsum'])
def test_paths_equal_dense_reference_without_drops(kind, path):
  d, n = 12, 20
  cfg = moe_cfg(expert_kind=kind, capacity_factor=50.0)
  w = weights(cfg, d)
  x = np.random.default_rng(2).normal(size=(n, d)).astype(np.float32)
  y, e, wt, drops = run(jnp.asarray(x), router_params(cfg, d), {k: jnp.asarray(v) for k, v in w.items()}, cfg, path)
  assert float(drops[2]) == 0.0
  y_ref = ref.dense_moe(x.astype(np.float64), np.asarray(e), np.asarray(wt, np.float64), np.ones(e.shape, bool), w, kind)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('kind', ['mlp', 'glu'])
def test_paths_agree_with_drops_and_match_reference(kind):
  d, n = 12, 64
  cfg = moe_cfg(expert_kind=kind, capacity_factor=0.5)
  w = weights(cfg, d)
  wj = {k: jnp.asarray(v) for k, v in w.items()}
  x = np.random.default_rng(5).normal(size=(n, d)).astype(np.float32)
  outs = {p: run(jnp.asarray(x), router_params(cfg, d), wj, cfg, p) for p in ('capacity', 'gather', 'einsum')}
  y0, e, wt, drops = outs['capacity']
  assert float(drops[2]) > 0.1, 'this case must drop'
  for p in ('gather', 'einsum'):
    np.testing.assert_allclose(np.asarray(outs[p][0]), np.asarray(y0), rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(outs[p][3]), np.asarray(drops))
  cap = int(np.ceil(0.5 * n * cfg.k_active / cfg.experts_total))
  _, keep = ref.capacity_keep(np.asarray(e), cap)
  y_ref = ref.dense_moe(x.astype(np.float64), np.asarray(e), np.asarray(wt, np.float64), keep, w, kind)
  np.testing.assert_allclose(np.asarray(y0), y_ref, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(drops[2]), 1 - keep.mean())


def test_auto_picks_by_regime():
  def path_taken(cfg, d=8, n=32):
    return resolve_dispatch(cfg, n, cfg.experts_total)   # what moe_ffn runs for n tokens

  assert path_taken(moe_cfg(dispatch='auto')) == 'capacity'
  huge = moe_cfg(dispatch='auto', num_tiers=4, groups_per_tier=16, experts_per_group=16, k_group=1, k_expert=1)
  assert path_taken(huge) == 'gather'      # E = 1024 >> 1.25 · 32 · 1
  assert path_taken(moe_cfg(dispatch='einsum')) == 'einsum'


def finite_difference_check(f, arr, idx, eps=1e-2):
  plus, minus = arr.copy(), arr.copy()
  plus[idx] += eps
  minus[idx] -= eps
  return (f(plus) - f(minus)) / (2 * eps)


@pytest.mark.parametrize('path', ['capacity', 'gather'])
def test_gradients_reach_router_and_experts(path):
  d, n = 6, 8
  cfg = moe_cfg(capacity_factor=50.0, d_expert=4)
  w = {k: jnp.asarray(v) for k, v in weights(cfg, d).items()}
  rp = router_params(cfg, d)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(n, d)).astype(np.float32))
  target = jnp.asarray(np.random.default_rng(8).normal(size=(n, d)).astype(np.float32))

  def loss(rp, w):
    r = route(x, rp, cfg)
    y, _ = moe_ffn(x, r, w, cfg, path)
    return jnp.sum((y - target) ** 2)

  g_rp, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(rp, w)
  assert float(jnp.abs(g_rp['expert']).sum()) > 0 and float(jnp.abs(g_rp['group']).sum()) > 0
  assert float(jnp.abs(g_rp['tier']).sum()) > 0 and float(jnp.abs(g_w['w_in']).sum()) > 0
  loss_j = jax.jit(loss)
  r = route(x, rp, cfg)
  used = int(r.expert_nk[0, 0])
  checks = [('expert', rp['expert'], (used // 4, 2, used % 4), g_rp['expert']),
            ('tier', rp['tier'], (1, 0), g_rp['tier']),
            ('group', rp['group'], (int(r.tier_nk[0, 0]), 3, 1), g_rp['group'])]
  for name, arr, idx, grad in checks:
    a = np.asarray(arr, np.float32)
    fd = finite_difference_check(lambda v: float(loss_j({**rp, name: jnp.asarray(v)}, w)), a, idx)
    np.testing.assert_allclose(float(grad[idx]), fd, rtol=3e-2, atol=1e-3)
  a = np.asarray(w['w_in'])
  idx = (used, 1, 2)
  fd = finite_difference_check(lambda v: float(loss_j(rp, {**w, 'w_in': jnp.asarray(v)})), a, idx)
  np.testing.assert_allclose(float(g_w['w_in'][idx]), fd, rtol=3e-2, atol=1e-3)


@pytest.mark.parametrize('experts,rows', [(128, 3), (128, 200), (8, 3)])  # CPU: loop only for the first
def test_expert_matmul_gradients_match_einsum(experts, rows):
  from litejax.model.moe.rows import expert_matmul
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.normal(size=(experts, rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(experts, 6, 7)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(experts, rows, 7)), jnp.float32)

  def loss(mm):
    return lambda x, w: jnp.sum(jnp.tanh(mm(x, w)) * t)
  got = jax.jit(jax.value_and_grad(loss(expert_matmul), argnums=(0, 1)))(x, w)
  want = jax.value_and_grad(loss(lambda a, b: jnp.einsum('eca,eab->ecb', a, b)), argnums=(0, 1))(x, w)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
  hlo = jax.jit(jax.grad(loss(expert_matmul), argnums=(0, 1))).lower(x, w).compile().as_text()
  assert ('while' in hlo) == (experts >= 128 and rows <= 128)


# DeepSeek-V3's routing in miniature: 12 experts in 4 groups of 3, keep 2 groups, 3 experts pooled over
# them, sigmoid scores with top-2 group scores, weights renormalised and scaled by 2.5.
POOLED = dict(num_tiers=1, groups_per_tier=4, experts_per_group=3, k_tier=1, k_group=2, k_expert=3,
              score='sigmoid', expert_selection='pooled', group_score='top2_experts', routed_scale=2.5)


@pytest.mark.parametrize('path', ['capacity', 'gather', 'einsum', 'dropless'])
def test_pooled_routing_on_every_path_matches_reference(path):
  d, n = 12, 40
  cfg = moe_cfg(**POOLED, expert_kind='glu', capacity_factor=0.75)
  w = weights(cfg, d)
  x = np.random.default_rng(9).normal(size=(n, d)).astype(np.float32)
  y, e, wt, drops = run(jnp.asarray(x), router_params(cfg, d), {k: jnp.asarray(v) for k, v in w.items()}, cfg, path)
  assert e.shape == (n, 3) and np.allclose(np.asarray(wt).sum(1), 2.5, rtol=1e-5)
  cap = int(np.ceil(0.75 * n * cfg.k_active / cfg.experts_total))
  keep = np.ones(e.shape, bool) if path == 'dropless' else ref.capacity_keep(np.asarray(e), cap)[1]
  assert path == 'dropless' or not keep.all(), 'this case must drop'
  y_ref = ref.dense_moe(x.astype(np.float64), np.asarray(e), np.asarray(wt, np.float64), keep, w, 'glu')
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(drops[2]), 1 - keep.mean(), atol=1e-6)
  np.testing.assert_allclose(float(drops[1]), float(drops[0]))   # pooled: the group figure is the tier's


def test_pooled_gradients_match_finite_differences():
  d, n = 6, 8
  cfg = moe_cfg(**POOLED, capacity_factor=50.0, d_expert=4)
  w = {k: jnp.asarray(v) for k, v in weights(cfg, d).items()}
  rp = {'expert': router_params(cfg, d)['expert'] * 0.5}
  x = jnp.asarray(np.random.default_rng(7).normal(size=(n, d)).astype(np.float32))
  target = jnp.asarray(np.random.default_rng(8).normal(size=(n, d)).astype(np.float32))

  def loss(rp, w):
    r = route(x, rp, cfg)
    return jnp.sum((moe_ffn(x, r, w, cfg, 'gather')[0] - target) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))   # one compile for both

  def loss_j(rp, w):
    return value_and_grad(rp, w)[0]

  _, (g_rp, g_w) = value_and_grad(rp, w)
  used = int(jax.jit(lambda rp: route(x, rp, cfg).expert_nk)(rp)[0, 1])
  a = np.asarray(rp['expert'])
  idx = (used // 3, 2, used % 3)
  fd = finite_difference_check(lambda v: float(loss_j({'expert': jnp.asarray(v)}, w)), a, idx, eps=1e-3)
  np.testing.assert_allclose(float(g_rp['expert'][idx]), fd, rtol=3e-2, atol=1e-3)
  assert abs(fd) > 1e-3, 'the checked router entry must matter'
  a = np.asarray(w['w_in'])
  idx = (used, 1, 2)
  fd = finite_difference_check(lambda v: float(loss_j(rp, {**w, 'w_in': jnp.asarray(v)})), a, idx)
  np.testing.assert_allclose(float(g_w['w_in'][idx]), fd, rtol=3e-2, atol=1e-3)
