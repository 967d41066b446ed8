"""Loss-free balancing (sigmoid scoring, moe.bias_update_rate > 0) moves every level's selection bias:
per-level load entropy rises against rate 0 on the same seed and batches, the gates stay the
unbiased scores (NumPy reference), and train() logs the per-level entropies in metrics.jsonl."""
import jax
import numpy as np
import pytest

import reference as ref
from litejax.model.moe import routing
from litejax import sharding
from litejax.train import step as train_step
from litejax.train.optimizer import make_optimizer
from litejax.train import loop as train_lib
from litejax.config import MeshConfig, load_config
from litejax.train.metrics import read_metrics
from train_helpers import TINY, TINY_YAML, enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()
# 2 tiers x 2 groups x 4 experts, one of each kept: every level has branches to balance.
HIER = ['moe.num_tiers=2', 'moe.groups_per_tier=2', 'moe.experts_per_group=4', 'moe.k_tier=1',
        'moe.k_group=1', 'moe.k_expert=2', 'moe.score=sigmoid', 'moe.num_shared_experts=0',
        'model.num_layers=2', 'train.lr=1e-12', 'train.warmup_steps=0']
STEPS = 12


def _cfg(rate, scan, *extra):
  return load_config(TINY_YAML, TINY + HIER + [f'moe.bias_update_rate={rate}',
                                               f'model.scan_layers={str(scan).lower()}', *extra])


def _train(cfg):
  """STEPS updates on one device, the same batch each step (4 distinct tokens, so routing starts
  skewed). lr ~0: only the selection biases move. Returns the metrics averaged over the last 4 steps
  (sign steps oscillate around even load)."""
  mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  tx = make_optimizer(cfg.train)
  graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
  state = train_step.init_state(cfg, mesh, tx, shardings)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, sharding.batch_sharding(mesh))
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 4, (cfg.train.batch_size, cfg.model.seq_len + 1), dtype=np.int32)
  ms = []
  with jax.set_mesh(mesh):
    for _ in range(STEPS):
      state, m = step(state, tok[:, :-1], tok[:, 1:])
      ms.append(jax.device_get(m))
  keys = [k for k in ms[-1] if k.endswith('_load_entropy')]
  return graphdef, state, {k: np.mean([float(m[k]) for m in ms[-4:]]) for k in keys}


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_bias_raises_every_level_entropy_and_keeps_gates(scan):
  _, _, m0 = _train(_cfg(0.0, scan))
  graphdef, state, m1 = _train(_cfg(0.05, scan))
  for level in ('tier', 'group', 'expert'):
    key = f'{level}_load_entropy'
    assert float(m1[key]) > float(m0[key]), (key, float(m0[key]), float(m1[key]))

  # The first MoE block's biases moved; selection uses them, the gates do not.
  cfg = _cfg(0.05, scan)
  from flax import nnx
  block = nnx.merge(graphdef, state['params'], state['extra']).moe_blocks()[0]
  pick = (lambda a: np.asarray(a[0])) if scan else np.asarray
  bias = {k: pick(v) for k, v in block.router_bias().items()}
  params = {k: pick(v) for k, v in block.router_params().items()}
  assert np.abs(bias['expert']).max() > 0 and np.abs(bias['group']).max() > 0, bias   # (tier: may sit at 0 after ± steps)
  x = np.random.default_rng(1).normal(size=(64, cfg.model.d_model)).astype(np.float32)
  r = routing.route(x, params, cfg.moe, bias)
  m = cfg.moe
  dims = (m.num_tiers, m.groups_per_tier, m.experts_per_group, m.k_tier, m.k_group, m.k_expert)
  e_ref, w_ref = ref.hierarchical_route(x, params, *dims, score='sigmoid', bias=bias)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), e_ref)
  np.testing.assert_allclose(np.asarray(r.weight_nk), w_ref, rtol=1e-5, atol=1e-6)
  e_unbiased, _ = ref.hierarchical_route(x, params, *dims, score='sigmoid')
  assert (e_ref != e_unbiased).any()        # the biases do change selection


def test_update_selection_bias_compares_siblings():
  # 2 parents x 2 children: loads (3, 1 | 5, 5) -> (-, + | 0, 0), whatever the global mean.
  out = routing.update_selection_bias(np.zeros(4, np.float32), np.array([3, 1, 5, 5]), 0.5, num_parents=2)
  np.testing.assert_array_equal(np.asarray(out), [-0.5, 0.5, 0.0, 0.0])


def test_train_logs_per_level_entropy(tmp_path):
  cfg = _cfg(0.05, False, 'train.steps=2', 'train.eval_every=2', 'train.ckpt_every=2')
  train_lib.train(cfg, metrics_path=tmp_path / 'm.jsonl', quiet=True)
  for rec in read_metrics(tmp_path / 'm.jsonl'):
    assert {'tier_load_entropy', 'group_load_entropy', 'expert_load_entropy'} <= set(rec)
    assert all(0.0 < rec[k] <= 1.0 for k in ('tier_load_entropy', 'group_load_entropy'))
  flat = load_config(TINY_YAML, TINY + ['train.steps=1'])        # T = G = 1: those levels omitted
  train_lib.train(flat, metrics_path=tmp_path / 'f.jsonl', quiet=True)
  rec = read_metrics(tmp_path / 'f.jsonl')[0]
  assert 'expert_load_entropy' in rec and 'tier_load_entropy' not in rec and 'group_load_entropy' not in rec
