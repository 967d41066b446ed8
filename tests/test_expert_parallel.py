"""Expert-parallel dispatch (chosen by the ambient mesh): per-device capacity semantics, paths, and
all-to-all bytes vs analytic."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litejax.hlo import collectives as comm
from litejax.model.moe import dispatch, buffer_plan as ep_plan, expert_parallel, routing
from litejax import sharding
from litejax.train import step as train_step
from litejax.config import ConfigError, MeshConfig
from sharding_helpers import tiny_config

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8


def _moe_inputs(cfg, n, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  m, d = cfg.moe, cfg.model.d_model
  x = jax.random.normal(ks[0], (n, d))
  params = {'expert': jax.random.normal(ks[1], (m.num_tiers * m.groups_per_tier, d, m.experts_per_group))}
  if m.groups_per_tier > 1:
    params['group'] = jax.random.normal(ks[2], (m.num_tiers, d, m.groups_per_tier))
  w = {'w_in': jax.random.normal(ks[3], (m.experts_total, d, m.d_expert)) * d ** -0.5,
       'w_out': jax.random.normal(ks[4], (m.experts_total, m.d_expert, d)) * m.d_expert ** -0.5}
  return x, params, w


def _run_ep(cfg, mesh_shape, x, params, w):
  mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[:int(np.prod(mesh_shape))])
  tok = sharding.logical_sharding(mesh, ('batch', 'embed'))
  w_sh = {k: sharding.logical_sharding(mesh, ('expert', 'expert_mlp', 'embed') if k == 'w_out'
                                       else ('expert', 'embed', 'expert_mlp')) for k in w}

  @jax.jit
  def run(x, w):
    return expert_parallel.moe_ffn(x, routing.route(x, params, cfg.moe), w, cfg.moe)

  with jax.set_mesh(mesh):
    return run(jax.device_put(x, tok), jax.device_put(w, w_sh))


@pytest.mark.parametrize('dispatch_path, mesh_shape', [('capacity', (4, 1, 1)), ('capacity', (2, 2, 1)),
                                                       ('gather', (1, 4, 1))])
def test_capacity_is_per_source_rank(dispatch_path, mesh_shape):
  """With drops, each (data, expert) rank keeps exactly what local dispatch on its own tokens keeps."""
  # k_group = G: every group kept, so router_expert is not split by group (its visits would drop too).
  cfg = tiny_config(capacity_factor=0.5, dispatch=dispatch_path, k_group=4)
  x, params, w = _moe_inputs(cfg, 128)
  y, drop = _run_ep(cfg, mesh_shape, x, params, w)
  ranks = mesh_shape[0] * mesh_shape[1]
  ys, drops = [], []
  for xs in jnp.split(x, ranks):
    ref_y, ref_drop = dispatch.moe_ffn(xs, routing.route(xs, params, cfg.moe), w, cfg.moe)
    ys.append(ref_y)
    drops.append(ref_drop)
  assert float(jnp.mean(jnp.stack(drops), 0)[2]) > 0.05          # the test really drops
  np.testing.assert_allclose(y, jnp.concatenate(ys), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(drop, jnp.mean(jnp.stack(drops), 0), rtol=1e-6)


@pytest.mark.parametrize('moe', [dict(rank_aligned_groups=True),
                                 dict(rank_aligned_groups=True, dispatch='gather'),
                                 # DeepSeek-V3's pooled routing; the second with router-scored groups, whose
                                 # router_expert is split by group over the 4 expert ranks (router_parallel)
                                 dict(expert_selection='pooled', group_score='top2_experts', score='sigmoid',
                                      k_expert=3, routed_scale=2.5),
                                 dict(expert_selection='pooled', k_expert=3, dispatch='gather')], ids=str)
def test_paths_equal_single_device_without_drops(moe):
  cfg = tiny_config(**moe)
  x, params, w = _moe_inputs(cfg, 128, seed=1)
  y, drop = _run_ep(cfg, (2, 4, 1), x, params, w)
  ref, _ = dispatch.moe_ffn(x, routing.route(x, params, cfg.moe), w, cfg.moe)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert float(drop.max()) == 0.0


@functools.lru_cache(maxsize=None)
def _a2a_bytes(cfg, r, grad=False):
  """Measured all-to-all bytes per rank of the whole (scanned) model on mesh (1, r, 1)."""
  mesh = sharding.make_mesh(MeshConfig(1, r, 1), devices=jax.devices()[:r])
  graphdef, abstract, _ = train_step.state_layout(cfg, mesh)
  state = (abstract['params'], abstract['extra'])
  tokens = jax.ShapeDtypeStruct((GLOBAL_BATCH, cfg.model.seq_len), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))

  def fwd(st, t):
    return nnx.merge(graphdef, *st)(t)[0].sum()

  f = jax.grad(fwd) if grad else fwd
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(state, tokens).compile()
  return comm.collective_bytes(compiled)


def _scanned(**moe):
  cfg = tiny_config(capacity_factor=1.25, **moe)
  # 4 layers scanned as 2 (dense, MoE) periods: the all-to-alls sit in a while loop run twice.
  return cfg.replace(model=dataclasses.replace(cfg.model, scan_layers=True, num_layers=4))


def _analytic(cfg, r):
  n = GLOBAL_BATCH * cfg.model.seq_len
  return ep_plan.analytic_all_to_all_bytes_per_rank(cfg, n, (1, r, 1), 4)['total'] * cfg.model.num_moe_layers


def test_all_to_all_bytes_match_analytic_and_fall_as_one_over_r():
  cfg = _scanned()
  measured = {r: _a2a_bytes(cfg, r) for r in (1, 2, 4, 8)}
  for r, m in measured.items():
    assert m['unknown_trip_count'] == []
    assert abs(m['all_to_all'] - _analytic(cfg, r)) <= 0.02 * max(_analytic(cfg, r), 1), (r, m)
  assert measured[1]['all_to_all'] == 0                    # one expert rank: nothing to exchange
  # The experts' all-to-alls; the router's (router_expert split by its 4 groups at R_EP = 2, 4, not 8) apart.
  n = GLOBAL_BATCH * cfg.model.seq_len
  router = {r: ep_plan.analytic_all_to_all_bytes_per_rank(cfg, n, (1, r, 1), 4)['router'] * cfg.model.num_moe_layers
            for r in (2, 4, 8)}
  assert router[2] > 0 and router[4] > 0 and router[8] == 0
  per_r = {r: (measured[r]['all_to_all'] - router[r]) * r for r in (2, 4, 8)}
  assert max(per_r.values()) <= 1.02 * min(per_r.values()), per_r
  # and the per-rank volume is capacity_factor*N*K*d*bytes/R_EP per all-to-all
  n, k, d = GLOBAL_BATCH * cfg.model.seq_len, cfg.moe.k_active, cfg.model.d_model
  per_a2a = measured[8]['all_to_all'] / (2 * cfg.model.num_moe_layers)
  assert per_a2a == pytest.approx(cfg.moe.capacity_factor * n * k * d * 4 / 8, rel=0.02)


def test_backward_doubles_all_to_all():
  cfg = _scanned()
  m = _a2a_bytes(cfg, 4, grad=True)
  assert m['all_to_all'] == pytest.approx(2 * _analytic(cfg, 4), rel=0.02)


def test_gather_path_bytes_match_analytic():
  cfg = _scanned(dispatch='gather')
  assert abs(_a2a_bytes(cfg, 4)['all_to_all'] - _analytic(cfg, 4)) <= 0.02 * _analytic(cfg, 4)


def test_rank_aligned_groups_cut_volume_by_predicted_factor():
  plain, aligned = _scanned(), _scanned(rank_aligned_groups=True)
  m_plain, m_aligned = _a2a_bytes(plain, 4)['all_to_all'], _a2a_bytes(aligned, 4)['all_to_all']
  assert abs(m_aligned - _analytic(aligned, 4)) <= 0.02 * _analytic(aligned, 4)
  predicted = _analytic(plain, 4) / _analytic(aligned, 4)
  assert m_plain / m_aligned == pytest.approx(predicted, rel=0.02)
  # activations fall by K / (k_tier*k_group) = k_expert; metadata (ids, weights) is the rest
  n = GLOBAL_BATCH * plain.model.seq_len
  a_plain = ep_plan.analytic_all_to_all_bytes_per_rank(plain, n, (1, 4, 1), 4)
  a_aligned = ep_plan.analytic_all_to_all_bytes_per_rank(aligned, n, (1, 4, 1), 4)
  assert a_plain['dispatch'] / a_aligned['dispatch'] == pytest.approx(plain.moe.k_expert, rel=0.02)
  assert predicted > 1.5


def test_collective_bytes_parses_tuples_and_loops():
  hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %a2a = (f32[1,8]{1,0}, f32[1,8]{1,0}, f32[1,8]{1,0}, f32[1,8]{1,0}) all-to-all(%x, %y, %z, %w), replica_groups={{0,1,2,3}}
  %ag = f32[8,8]{1,0} all-gather(%q), replica_groups=[2,2]<=[4], dimensions={0}
  %rs = f32[2,8]{1,0} reduce-scatter(%q), replica_groups={{0,1},{2,3}}, dimensions={0}, to_apply=%add
  %noop = f32[100]{0} all-reduce(%q), replica_groups={{0},{1},{2},{3}}, to_apply=%add
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%t), condition=%cond, body=%body
  %ar = f32[16]{0} all-reduce(%a), replica_groups={}, to_apply=%add
}
"""
  out = comm.collective_bytes(hlo)
  assert out['all_to_all'] == 5 * 4 * 8 * 4
  assert out['all_gather'] == 5 * 8 * 8 * 4
  assert out['reduce_scatter'] == 5 * 2 * 8 * 4 * 2
  assert out['all_reduce'] == 16 * 4
  assert out['total'] == sum(out[k] for k in comm.KINDS)


def test_dispatch_follows_the_ambient_mesh():
  """No mesh or a one-device mesh: local dispatch; a multi-device litejax mesh: shard_map with
  all-to-alls; a mesh that does not divide the experts is a ConfigError when traced."""
  cfg = tiny_config()
  x, params, w = _moe_inputs(cfg, 32)

  def f(x, w):
    return expert_parallel.moe_ffn(x, routing.route(x, params, cfg.moe), w, cfg.moe)[0]

  def text(mesh):
    if mesh is None:
      return jax.jit(f).lower(x, w).as_text()
    with jax.set_mesh(mesh):
      return jax.jit(f).lower(x, w).as_text()

  one = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  assert 'all_to_all' not in text(None) and 'all_to_all' not in text(one)
  assert 'all_to_all' in text(sharding.make_mesh(MeshConfig(1, 4, 1), devices=jax.devices()[:4]))
  with pytest.raises(ConfigError, match=r'is not divisible by mesh.expert \(3\)'):
    text(sharding.make_mesh(MeshConfig(1, 3, 1), devices=jax.devices()[:3]))
