"""Dropless dispatch (litejax.model.moe.dropless) against the dense NumPy reference with nothing dropped."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from litejax.model import bounds
from litejax.model.moe.capacity import dropless_tiles
from litejax.config import from_dict
from litejax.model.moe.dispatch import moe_ffn
from litejax.model.moe.dropless import dropless_moe, sort_by_expert, tile_rows
from litejax.model.moe.routing import route
from test_dispatch import moe_cfg, router_params, weights

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow


def test_tile_layout_by_hand():
  # Experts [2, 0, 2, 2, 1] with tiles of 2 rows: e0 -> rows 0 (+pad 1), e1 -> 2 (+pad 3), e2 -> 4, 5, 6 (+pad 7).
  experts = jnp.array([2, 0, 2, 2, 1])
  order, sorted_e, rank, run = sort_by_expert(experts[:, None])
  np.testing.assert_array_equal(np.asarray(sorted_e), [0, 1, 2, 2, 2])
  np.testing.assert_array_equal(np.asarray(order), [1, 4, 0, 2, 3])
  np.testing.assert_array_equal(np.asarray(rank), [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(run), [1, 1, 3, 3, 3])
  np.testing.assert_array_equal(np.asarray(tile_rows(sorted_e, rank, run, 2)), [0, 2, 4, 5, 6])


@pytest.mark.parametrize('a,e', [(4, 16), (512, 16), (7, 3), (1000, 1000), (32768, 16)])
def test_tile_count_bounds_any_load(a, e):
  t, tiles = dropless_tiles(a, e)
  assert t * tiles <= a + min(a, e) * (t - 1)
  # Worst cases: every busy expert one row past a tile boundary, or all load on one expert.
  rng = np.random.default_rng(0)
  busy = min(a, e)
  for counts in (np.full(busy, a // busy) + (np.arange(busy) < a % busy), np.r_[a - busy + 1, np.ones(busy - 1, int)],
                 np.bincount(rng.integers(0, e, a), minlength=e)):
    assert int(np.sum(-(-counts // t))) <= tiles, (counts, t, tiles)


@functools.partial(jax.jit, static_argnums=(3, 4))
def run_moe(x, rp, w, cfg, impl):
  r = route(x, rp, cfg)
  if impl == 'moe_ffn':
    y, drop = moe_ffn(x, r, w, cfg, 'dropless')
    assert drop.shape == (3,)
  else:
    y = dropless_moe(x, r.expert_nk, r.weight_nk, w, cfg.expert_kind, impl)
  return y, r.expert_nk, r.weight_nk


@pytest.mark.parametrize('impl', ['moe_ffn', 'direct', 'tiles', 'ragged'])
@pytest.mark.parametrize('kind', ['mlp', 'glu'])
def test_equals_dense_reference_with_skewed_load(kind, impl):
  # A router bias toward a few experts: far past capacity_factor 1.25 for them, yet nothing may drop.
  d, n = 12, 40
  cfg = moe_cfg(expert_kind=kind)
  w = weights(cfg, d)
  rp = router_params(cfg, d)
  rp['expert'] = rp['expert'].at[:, :, 0].add(5.0 * jnp.sign(rp['expert'][:, :, 0]))
  x = np.random.default_rng(2).normal(size=(n, d)).astype(np.float32)
  y, e, wt = run_moe(jnp.asarray(x), rp, {k: jnp.asarray(v) for k, v in w.items()}, cfg, impl)
  counts = np.bincount(np.asarray(e).reshape(-1), minlength=cfg.experts_total)
  assert counts.max() > 1.25 * n * cfg.k_active / cfg.experts_total     # a capacity buffer would drop here
  y_ref = ref.dense_moe(x.astype(np.float64), np.asarray(e), np.asarray(wt, np.float64), np.ones(e.shape, bool), w, kind)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['direct', 'tiles', 'ragged'])
def test_gradients_match_gather_path(impl):
  # The gather path drops nothing at capacity_factor 50 and its gradients are checked against finite
  # differences in test_dispatch; dropless must give the same gradients for inputs, router and experts.
  d, n = 8, 12
  cfg = moe_cfg(expert_kind='glu', capacity_factor=50.0)
  w = {k: jnp.asarray(v) for k, v in weights(cfg, d).items()}
  rp = router_params(cfg, d)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(n, d)), jnp.float32)

  def loss(fn):
    def f(x, rp, w):
      r = route(x, rp, cfg)
      return jnp.sum(jnp.sin(fn(x, r, w)))
    return f

  want = jax.grad(loss(lambda x, r, w: moe_ffn(x, r, w, cfg, 'gather')[0]), argnums=(0, 1, 2))(x, rp, w)
  got = jax.jit(jax.grad(loss(lambda x, r, w: dropless_moe(x, r.expert_nk, r.weight_nk, w, 'glu', impl)),
                         argnums=(0, 1, 2)))(x, rp, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_decode_sized_call_runs_no_sort_on_cpu():
  # At t = 1 (a few tokens per step) the CPU form gathers each assignment's slices: no argsort, no
  # searchsorted, no scatter back; with more tokens per expert it keeps the bounded tiles (one sort).
  from litejax.hlo import parse as hlo
  from litejax.model.moe.dropless import cpu_impl
  cfg = moe_cfg(expert_kind='glu')
  d = 12
  w = {k: jnp.asarray(v) for k, v in weights(cfg, d).items()}
  rp = router_params(cfg, d)
  assert cpu_impl(2 * cfg.k_active, cfg.experts_total) == 'direct'
  assert cpu_impl(4096 * cfg.k_active, cfg.experts_total) == 'tiles'
  for n, sorts in ((2, 0), (4096, 1)):
    x = jnp.zeros((n, d), jnp.float32)
    text = run_moe.lower(x, rp, w, cfg, 'auto').compile().as_text()
    kinds = hlo.kernel_counts(hlo.parse(text))
    assert kinds.get('sort', 0) == sorts, (n, kinds)


def test_analytic_bound_counts_the_tiles():
  cfg = from_dict({'moe': dict(experts_per_group=16, k_expert=4, d_expert=32, dispatch='dropless')})
  n = 128
  t, tiles = dropless_tiles(n * 4, 16)
  f = bounds.forward_flops_per_token(cfg, n)
  assert f['experts'] == pytest.approx(cfg.model.num_layers * t * tiles / n * bounds.expert_flops(cfg))
  assert t * tiles > n * 4      # the padding is counted, not hidden


def test_expert_parallel_plan_has_room_for_every_assignment():
  from litejax.model.moe import buffer_plan as ep_plan
  cfg = moe_cfg(dispatch='dropless')
  for n, ranks in ((1, 2), (3, 4), (16, 1)):
    p = ep_plan.plan(cfg, n, ranks)
    assert (p.path, p.slots_per_rank, p.bucket_capacity) == ('gather', n * cfg.k_active, n * cfg.k_active)
