"""Sharded training equals single-device training on emulated CPU meshes; shardings are real."""
import jax
import numpy as np
import pytest

from litejax.train.optimizer import make_optimizer
from litejax import sharding
from litejax.train import step as train_step
from litejax.config import Config, ConfigError, MeshConfig, ModelConfig
from sharding_helpers import tiny_config, train_losses

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

# Each axis alone where it can take all 8 devices, and all three at once (data x expert and data x tensor
# mixes are covered by (2, 2, 2); tests/test_sparse_train.py trains on (2, 4, 1)).
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


@pytest.fixture(scope='module')
def reference():
  mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  return train_losses(tiny_config(), mesh)


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_training_matches_single_device(shape, reference):
  mesh = sharding.make_mesh(MeshConfig(*shape))
  losses, (logits, grads) = train_losses(tiny_config(), mesh)
  ref_losses, (ref_logits, ref_grads) = reference
  # f32 sums in another order (tensor-parallel partial sums, per-shard reductions): rtol 1e-5, and
  # an absolute floor of 1e-5 x the array's scale for entries that are near zero.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
  ref_leaves = jax.tree.leaves(ref_grads)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), ref_leaves, strict=True):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]


def test_expert_weights_are_sharded_over_expert_axis():
  cfg = tiny_config()
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
  _, _, shardings = train_step.state_layout(cfg, mesh)
  state = train_step.init_state(cfg, mesh, make_optimizer(cfg.train), shardings)['params']
  e, r = cfg.moe.experts_total, 4
  moe = state['blocks'][1]['ffn']          # layer 2 is the MoE layer
  for name in ('w_in', 'w_out'):
    arr = moe[name][...]
    assert arr.shape[0] == e
    assert {s.data.shape[0] for s in arr.addressable_shards} == {e // r}
    # the 8 devices hold 4 distinct expert blocks, each twice (data axis replicates)
    starts = sorted(s.index[0].start or 0 for s in arr.addressable_shards)
    assert starts == [0, 0, 2, 2, 4, 4, 6, 6]
  attn = state['blocks'][0]['attn']['w_q'][...]
  assert attn.sharding.spec == sharding.logical_to_spec(('embed', 'heads', 'head_dim'))


def test_scanned_model_gets_leading_layer_axis():
  cfg = tiny_config()
  cfg = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, 'scan_layers': True}))
  mesh = sharding.make_mesh(MeshConfig(1, 4, 2))
  ab = train_step.state_layout(cfg, mesh)[1]['params']
  w_in = ab['periods']['layers'][1]['ffn']['w_in'].get_value()
  assert isinstance(w_in, jax.ShapeDtypeStruct)
  assert w_in.sharding.spec == jax.sharding.PartitionSpec(None, 'expert', None, 'tensor')
  assert w_in.sharding.shard_shape(w_in.shape) == (1, 2, 32, 16)


def test_optimizer_state_mirrors_params():
  import optax
  cfg = tiny_config()
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
  state = train_step.state_layout(cfg, mesh)[1]['params']
  p_sh = sharding.state_shardings(state, mesh)
  opt_sh = sharding.tree_shardings_like(jax.eval_shape(optax.adamw(1e-3).init, state), p_sh)
  mu = opt_sh[0].mu['blocks'][1]['ffn']['w_in'].get_value()
  assert mu.spec == jax.sharding.PartitionSpec('expert', None, 'tensor')
  assert opt_sh[0].count.spec == jax.sharding.PartitionSpec()


def test_logical_rules_and_specs():
  assert sharding.logical_to_spec(('expert', 'embed', 'expert_mlp')) == jax.sharding.PartitionSpec(
      'expert', None, 'tensor')
  assert sharding.logical_to_spec(('embed', 'heads'), ndim=3) == jax.sharding.PartitionSpec(None, None, 'tensor')
  assert sharding.batch_sharding(sharding.make_mesh(MeshConfig(2, 4, 1))).spec[0] == ('data', 'expert')
  with pytest.raises(KeyError):
    sharding.logical_to_spec(('no_such_axis',))
  mesh = sharding.make_mesh(MeshConfig(-1, 2, 2))
  assert dict(mesh.shape) == {'data': 2, 'expert': 2, 'tensor': 2}


@pytest.mark.parametrize('mesh_shape, devices, batch, needle', [
    ((1, 3, 1), 3, 3, '(8 = num_tiers*groups_per_tier*experts_per_group) is not divisible by mesh.expert (3)'),
    ((1, 1, 8), 8, 8, 'model.num_heads (4) is not divisible by mesh.tensor (8)'),
    ((1, 1, 4), 4, 8, 'model.num_kv_heads (2) is not divisible by mesh.tensor (4)'),
    ((2, 4, 1), 8, 12, 'batch size 12 is not divisible by mesh data*expert = 2*4 = 8'),
])
def test_mesh_that_does_not_divide_is_config_error(mesh_shape, devices, batch, needle):
  mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[:devices])
  with pytest.raises(ConfigError) as e:
    sharding.validate_mesh(tiny_config(), mesh, batch)
  assert needle in str(e.value)
  if mesh_shape[1] == 3:     # expert-parallel dispatch checks the MoE layer alone (test_expert_parallel)
    with pytest.raises(ConfigError):
      sharding.validate_moe_mesh(tiny_config().moe, sharding.mesh_sizes(mesh))


def test_device_count_mismatch_is_config_error():
  with pytest.raises(ConfigError, match=r'3\*1\*1 = 3 does not match the 8 devices'):
    sharding.make_mesh(MeshConfig(3, 1, 1))
  with pytest.raises(ConfigError, match='8 devices are not divisible'):
    sharding.make_mesh(MeshConfig(-1, 3, 1))


def test_plain_single_device_call_unchanged():
  cfg = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=4, seq_len=8, vocab_size=32))
  from litejax.model.transformer import init_model
  m = init_model(cfg)
  logits, _ = m(jax.numpy.zeros((2, 8), jax.numpy.int32))
  assert logits.shape == (2, 8, 32)
