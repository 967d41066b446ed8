"""router_expert split by group over the expert ranks (litejax.model.moe.router_parallel): the expert level scored on
the groups' owners equals the replicated table's routing, its logits and its gradient, with no all-gather."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from litejax.model.moe import buffer_plan as ep_plan, router_parallel, routing
from litejax import sharding
from litejax.config import MeshConfig, MoEConfig

D, N = 16, 64
CFG = MoEConfig(num_tiers=2, groups_per_tier=8, experts_per_group=4, k_tier=1, k_group=2, k_expert=2,
                d_expert=8, capacity_factor=8.0)   # C = N_loc·kept: nothing can drop


def _inputs():
  rng = np.random.default_rng(0)
  params = {'tier': rng.normal(size=(D, 2)), 'group': rng.normal(size=(2, D, 8)), 'expert': rng.normal(size=(16, D, 4))}
  return jnp.asarray(rng.normal(size=(N, D)), jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _on_mesh(mesh, x, params):
  params = dict(params, expert=jax.device_put(params['expert'], NamedSharding(mesh, P('expert'))))
  return jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES))), params


def _table_grad(x, params):
  return jax.grad(lambda p: jnp.sum(routing.route(x, p, CFG).weight_nk ** 2))(params)['expert']


@pytest.fixture(scope='module')
def replicated():
  x, params = _inputs()
  return x, params, jax.jit(lambda x, p: routing.route(x, p, CFG))(x, params), jax.jit(_table_grad)(x, params)


@pytest.mark.parametrize('shape', [(1, 8, 1), (2, 4, 1)], ids=['ep8', 'dp2-ep4'])
def test_routing_on_owner_equals_replicated(replicated, shape):
  x, params, want, want_grad = replicated
  mesh = sharding.make_mesh(MeshConfig(*shape), devices=jax.devices()[:8])
  xs, ps = _on_mesh(mesh, x, params)
  with jax.set_mesh(mesh):
    assert router_parallel.sharded_mesh(16, N) is not None
    fn = jax.jit(lambda x, p: routing.route(x, p, CFG))
    got = fn(xs, ps)
    text = fn.lower(xs, ps).compile().as_text()
    grad = jax.jit(_table_grad)(xs, ps)
  for field in ('expert_nk', 'group_nk', 'tokens_per_expert'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  for field in ('weight_nk', 'load_balance_loss', 'z_loss'):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-6, err_msg=field)
  assert 'all-to-all' in text and 'all-gather' not in text     # tokens travel, the table does not
  np.testing.assert_allclose(grad, want_grad, atol=1e-5)
  assert grad.sharding.spec == P('expert')                      # each owner's rows, none all-reduced


def test_owner_logits_equal_gathered_rows_and_drops_past_capacity():
  x, params = _inputs()
  mesh = sharding.make_mesh(MeshConfig(1, 8, 1), devices=jax.devices()[:8])
  group = jnp.asarray(np.random.default_rng(1).integers(0, 16, (N, 2)), jnp.int32)
  want = np.einsum('nd,ngde->nge', np.asarray(x), np.asarray(params['expert'])[np.asarray(group)])
  xs, ps = _on_mesh(mesh, x, params)
  gs = jax.device_put(group, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  with jax.set_mesh(mesh):
    logits, keep, _ = router_parallel.expert_logits(xs, ps['expert'], gs, CFG, mesh)
  assert np.asarray(keep).all()
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  # All of a rank's visits to one owner with room for half of them: the first half (slot-major order,
  # as dispatch) is scored, the rest dropped with zero logits.
  tight = dataclasses.replace(CFG, capacity_factor=4.0)
  c = ep_plan.router_slots_per_rank(tight, N // 8, 8)
  assert c == N // 8                                             # 8 tokens x 2 visits: room for 8
  same = jnp.zeros((N, 2), jnp.int32).at[:, 1].set(1)            # groups 0 and 1: both on rank 0
  with jax.set_mesh(mesh):
    logits, keep, _ = router_parallel.expert_logits(xs, ps['expert'], jax.device_put(same, gs.sharding), tight, mesh)
  keep = np.asarray(keep).reshape(8, N // 8, 2)
  assert keep[:, :, 0].all() and not keep[:, :, 1].any()
  np.testing.assert_array_equal(np.asarray(logits).reshape(8, N // 8, 2, 4)[:, :, 1], 0)


def test_indivisible_groups_stay_replicated():
  assert sharding.groups_shard(16, 8) and not sharding.groups_shard(12, 8) and not sharding.groups_shard(16, 1)
  mesh = sharding.make_mesh(MeshConfig(1, 8, 1), devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    assert router_parallel.sharded_mesh(12, N) is None           # routed from the whole table, as before
    assert router_parallel.sharded_mesh(16, N + 1) is None       # tokens the batch ranks do not split
