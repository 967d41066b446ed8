"""The sparse expert update (litejax.train.sparse_step) against the dense one: equal to optax AdamW when every expert
is touched, untouched rows bit-identical, temporaries that follow the touched rows, training with E ≫ N·K."""
import dataclasses

import jax
import numpy as np
import pytest

from litejax import sharding
from litejax.train import sparse_step as sparse_train, step as train_step
from litejax.train.optimizer import make_optimizer
from litejax.train.checkpoint import Checkpointer
from litejax.config import Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, TrainConfig, from_dict

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow


def small_config(groups=4, experts_per_group=2, scan=False, update='sparse', batch=8, optimizer='adamw'):
  """A dense layer then an MoE layer; K = k_group·k_expert = 4, router_expert gathered (k_group < groups)."""
  return Config(
      model=ModelConfig(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, seq_len=8, vocab_size=32,
                        d_ff=32, moe_every=2, scan_layers=scan),
      moe=MoEConfig(num_tiers=1, groups_per_tier=groups, experts_per_group=experts_per_group, k_group=2,
                    k_expert=2, d_expert=16, capacity_factor=8.0),
      train=TrainConfig(lr=1e-2, warmup_steps=2, steps=20, batch_size=batch, expert_update=update,
                        expert_optimizer=optimizer))


def _batch(cfg, step, fixed=False):
  rng = np.random.default_rng(0 if fixed else step)
  tok = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32)
  return np.ascontiguousarray(tok[:, :-1]), np.ascontiguousarray(tok[:, 1:])


def run(cfg, mesh, steps, fixed=False, keep=None):
  """(losses, states after each step as host numpy, tokens_per_expert per step) of `steps` updates;
  keep (a dict) receives the step function and the state shardings."""
  tx = make_optimizer(cfg.train)
  graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
  state = train_step.init_state(cfg, mesh, tx, shardings)
  bsh = sharding.batch_sharding(mesh)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, bsh)
  if keep is not None:
    keep.update(step=step, shardings=shardings, batch_sharding=bsh)
  losses, states, loads = [], [jax.device_get(state)], []
  for i in range(steps):
    x, y = (jax.device_put(a, bsh) for a in _batch(cfg, i, fixed))
    with jax.set_mesh(mesh):
      state, m = step(state, x, y)
    losses.append(float(m['loss']))
    loads.append(np.asarray(m['tokens_per_expert']))
    states.append(jax.device_get(state))
  return losses, states, loads


def _mesh(shape):
  return sharding.make_mesh(MeshConfig(*shape), devices=jax.devices()[:int(np.prod(shape))])


def test_config_choice_and_validation():
  cfg = small_config(update='auto')
  mesh = _mesh((1, 1, 1))
  # N·K = 64 tokens · 4 >= 8 experts: every expert is touched anyway -> dense; beyond N·K -> sparse.
  assert sparse_train.update_mode(cfg, mesh) == 'dense'
  assert sparse_train.update_mode(small_config(groups=64, experts_per_group=8, update='auto'), mesh) == 'sparse'
  assert sparse_train.update_mode(small_config(update='auto', optimizer='factored'), mesh) == 'sparse'
  assert 'expert update: sparse' in sparse_train.describe(small_config(groups=64, experts_per_group=8), mesh)
  assert 'u = 256' in sparse_train.describe(small_config(groups=64, experts_per_group=8), mesh)
  with pytest.raises(ConfigError, match='train.expert_update: must be one of'):
    from_dict({'train': {'expert_update': 'lazy'}})
  with pytest.raises(ConfigError, match='train.expert_optimizer: factored runs on the sparse path'):
    from_dict({'train': {'expert_update': 'dense', 'expert_optimizer': 'factored'}})


# Unscanned on one device and scanned on the (1, 8, 1) expert-parallel mesh: both layouts and both
# placements of the row update, at half the compiles of the full cross product.
CASES = [((1, 1, 1), False), ((1, 8, 1), True)]


@pytest.mark.slow
@pytest.mark.parametrize('shape,scan', CASES, ids=['1dev', 'ep8-scan'])
def test_every_expert_touched_equals_dense_adamw(shape, scan):
  mesh = _mesh(shape)
  dense_losses, dense_states, loads = run(small_config(scan=scan, update='dense'), mesh, 5)
  assert all((load > 0).all() for load in loads)       # the premise: every expert touched every step
  losses, states, _ = run(small_config(scan=scan), mesh, 5)
  np.testing.assert_allclose(losses, dense_losses, rtol=1e-6)
  want, got = dense_states[-1]['params'], states[-1]['params']
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
  counts = [np.asarray(st.count) for st in states[-1]['opt']['rows'].values()]
  assert all((c == 5).all() for c in counts)             # each row's own count: touched 5 times


@pytest.fixture(scope='module')
def many_experts():
  """E = 256 experts per layer, N·K = 64 assignments per step: most experts idle every step."""
  cfg = small_config(groups=16, experts_per_group=16, batch=2)
  mesh = _mesh((1, 1, 1))
  keep = {}
  return cfg, mesh, run(cfg, mesh, 12, fixed=True, keep=keep), keep


def test_untouched_rows_are_bit_identical(many_experts):
  cfg, _, (_, states, loads), _ = many_experts
  before, after = states[2], states[3]                  # step 3: past warmup's lr = 0 at step 1
  idle = loads[2][0] == 0                                # [E] experts no token chose at step 3
  assert 0 < idle.sum() < cfg.moe.experts_total
  for name in ('w_in', 'w_out'):
    w0, w1 = before['params']['blocks'][1]['ffn'][name], after['params']['blocks'][1]['ffn'][name]
    np.testing.assert_array_equal(w1[idle], w0[idle])
    assert (np.abs(w1[~idle] - w0[~idle]).max(axis=(1, 2)) > 0).all()
    st0, st1 = before['opt']['rows'][f'blocks.1.ffn.{name}'], after['opt']['rows'][f'blocks.1.ffn.{name}']
    for field in st0._fields:
      np.testing.assert_array_equal(np.asarray(getattr(st1, field))[idle], np.asarray(getattr(st0, field))[idle])
    np.testing.assert_array_equal(np.asarray(st1.count) - np.asarray(st0.count), (~idle).astype(np.int32))


@pytest.mark.slow
def test_many_experts_trains_like_dense(many_experts):
  cfg, mesh, (losses, _, _), _ = many_experts
  dense_losses, _, _ = run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, expert_update='dense')),
                           mesh, 12, fixed=True)
  assert losses[-1] < losses[0] - 0.3                    # memorising one batch: the loss falls
  # Lazy AdamW differs from dense AdamW only on idle experts (no decay, no momentum drift).
  np.testing.assert_allclose(losses, dense_losses, rtol=0.05)


def test_temporaries_follow_touched_rows_not_experts():
  """The compiled sparse step holds nothing of an expert table's size; the dense step does."""
  mesh = _mesh((1, 1, 1))
  temps = {}
  for update in ('sparse', 'dense'):
    cfg = small_config(groups=64, experts_per_group=16, batch=2, update=update)   # E = 1024
    tx = make_optimizer(cfg.train)
    graphdef, abstract, shardings = train_step.state_layout(cfg, mesh, tx)
    step = train_step.make_train_step(cfg, graphdef, tx, shardings, sharding.batch_sharding(mesh))
    tok = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), np.int32)
    with jax.set_mesh(mesh):
      temps[update] = step.lower(abstract, tok, tok).compile().memory_analysis().temp_size_in_bytes
  table_bytes = cfg.moe.experts_total * cfg.model.d_model * cfg.moe.d_expert * 4
  assert temps['sparse'] < table_bytes
  assert temps['dense'] > table_bytes


def test_checkpoint_resumes_bit_exact_and_restores_onto_expert_mesh(many_experts, tmp_path):
  cfg, mesh, (_, states, _), keep = many_experts
  ckpt = Checkpointer(tmp_path / 'ckpt', async_save=False)
  ckpt.save(3, jax.device_put(states[3], keep['shardings']), {'config': cfg.to_dict()})
  ckpt.wait()
  # Resume on the same device: the next step equals the uninterrupted run's, bit for bit.
  abstract = train_step.state_layout(cfg, mesh)[1]
  restored = ckpt.restore(abstract).state
  x, y = (jax.device_put(a, keep['batch_sharding']) for a in _batch(cfg, 3, fixed=True))
  with jax.set_mesh(mesh):
    resumed, _ = keep['step'](restored, x, y)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(states[4]), strict=True):
    np.testing.assert_array_equal(a, b)
  # Onto 8 devices with expert parallelism: the row state (counts included) shards like its table.
  ep_abstract = train_step.state_layout(cfg, _mesh((1, 8, 1)))[1]
  on_ep = ckpt.restore(ep_abstract).state
  ckpt.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(on_ep)), jax.tree.leaves(states[3]), strict=True):
    np.testing.assert_array_equal(a, b)
  row = on_ep['opt']['rows']['blocks.1.ffn.w_in']
  table = on_ep['params']['blocks'][1]['ffn']['w_in'][...]
  assert row.mu.sharding.spec == table.sharding.spec == jax.sharding.PartitionSpec('expert', None, 'tensor')
  assert row.count.sharding.spec == jax.sharding.PartitionSpec('expert')
  # router_expert (16 groups) splits by group over the 8 expert ranks there, its row state with it.
  router = on_ep['params']['blocks'][1]['ffn']['router_expert'][...]
  assert router.sharding.spec == jax.sharding.PartitionSpec('expert', None, None)
  assert on_ep['opt']['rows']['blocks.1.ffn.router_expert'].count.sharding.spec == jax.sharding.PartitionSpec('expert')


ROUTER_SPLIT = small_config(groups=8, experts_per_group=6, scan=True)   # T·G = 8 groups of E_g = 6


def _all_reduce_shapes(hlo_text: str) -> list[str]:
  return [line.split('=')[1].split('all-reduce(')[0] for line in hlo_text.splitlines() if ' all-reduce(' in line]


# (1, 8, 1) only: the (2, 4, 1) mesh's routing and router-table gradients (summed over data replicas) are
# checked against the replicated table in tests/test_router_parallel.py, without a whole train step.
@pytest.mark.parametrize('shape', [(1, 8, 1)], ids=['ep8'])
def test_router_split_by_group_equals_replicated(shape):
  """router_expert split by group over the expert ranks (scored on the owner, litejax.model.moe.router_parallel):
  3 sparse steps, scanned, equal the same mesh's steps with the table replicated, and no all-reduce
  carries router_expert rows."""
  cfg, mesh = ROUTER_SPLIT, _mesh(shape)
  with pytest.MonkeyPatch.context() as mp:   # the replicated table: routed from the whole table, as before
    mp.setattr(sharding, 'groups_shard', lambda groups, ranks: False)
    assert not sparse_train.router_split(cfg, sharding.mesh_sizes(mesh))
    want_losses, want_states, _ = run(cfg, mesh, 3)
  assert sparse_train.router_split(cfg, sharding.mesh_sizes(mesh))
  keep = {}
  losses, states, _ = run(cfg, mesh, 3, keep=keep)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  for key in ('params', 'opt'):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(states[-1][key]), jax.tree.leaves(want_states[-1][key]),
                            strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=key + jax.tree_util.keystr(path))
  specs = [s.spec for path, s in jax.tree_util.tree_leaves_with_path(keep['shardings']['params'])
           if 'router_expert' in jax.tree_util.keystr(path)]
  assert specs == [jax.sharding.PartitionSpec(None, 'expert', None, None)]   # [layers, T·G, d, Eg]
  if shape == (1, 8, 1):   # a router row is [d, Eg] = [16, 6]; only dense gradients are all-reduced
    tx = make_optimizer(cfg.train)
    abstract = train_step.state_layout(cfg, mesh, tx)[1]
    tok = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), np.int32)
    with jax.set_mesh(mesh):
      text = keep['step'].lower(abstract, tok, tok).compile().as_text()
    shapes = _all_reduce_shapes(text)
    assert shapes and not [s for s in shapes if '16,6]' in s], shapes


def test_bf16_tables_are_not_copied_as_f32():
  """bf16 expert tables, scanned: XLA:CPU (bf16 emulated) kept an f32 copy of each stacked table in the layer
  scan and another around the row update's scatter; read and written as uint16 bits (sparse_grad.take_rows /
  put_rows) one uint16 copy per table remains (the scatter is not in place on CPU)."""
  cfg = small_config(groups=64, experts_per_group=16, batch=2, scan=True)   # E = 1024
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, dtype='bfloat16', param_dtype='bfloat16'))
  mesh = _mesh((1, 1, 1))
  tx = make_optimizer(cfg.train)
  graphdef, abstract, shardings = train_step.state_layout(cfg, mesh, tx)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, sharding.batch_sharding(mesh))
  tok = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), np.int32)
  with jax.set_mesh(mesh):
    temp = step.lower(abstract, tok, tok).compile().memory_analysis().temp_size_in_bytes
  tables_bytes = 2 * cfg.moe.experts_total * cfg.model.d_model * cfg.moe.d_expert * 2   # w_in, w_out in bf16
  # One uint16 copy of each table and the small rest here; with the f32 copies 2.5x (checked by hand).
  assert temp < 2 * tables_bytes, (temp, tables_bytes)


def test_pooled_routing_trains_sparse_rows_and_balances_its_bias():
  """DeepSeek-V3's routing (sigmoid, top-2 group scores, 3 experts pooled over 3 kept groups of 8, scaled
  by 2.5) under the sparse update with loss-free balancing: experts no token chose keep their rows bit for
  bit, the chosen ones move, and the selection bias moves by the rate against each expert's load."""
  base = small_config(groups=8, experts_per_group=8, batch=2)
  moe = dataclasses.replace(base.moe, k_group=3, k_expert=3, score='sigmoid', expert_selection='pooled',
                            group_score='top2_experts', routed_scale=2.5, bias_update_rate=0.01, expert_kind='glu')
  cfg = from_dict(base.replace(moe=moe).to_dict())   # validated
  losses, states, loads = run(cfg, _mesh((1, 1, 1)), 3, fixed=True)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  before, after = states[2], states[3]
  idle = loads[2][0] == 0
  assert 0 < idle.sum() < cfg.moe.experts_total and loads[2][0].sum() == 16 * 3
  ffn0, ffn1 = before['params']['blocks'][1]['ffn'], after['params']['blocks'][1]['ffn']
  for name in ('w_in', 'w_gate', 'w_out'):
    np.testing.assert_array_equal(ffn1[name][idle], ffn0[name][idle])
    assert (np.abs(ffn1[name][~idle] - ffn0[name][~idle]).max(axis=(1, 2)) > 0).all()
  b0, b1 = (np.asarray(s['extra']['blocks'][1]['ffn']['bias_expert']) for s in (before, after))
  load = loads[2][0]
  np.testing.assert_allclose(b1 - b0, 0.01 * np.sign(load.mean() - load), atol=1e-7)
