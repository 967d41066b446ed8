"""A tiny sharded MoE LM for the sharding tests, trained with the real trainer's pieces
(`litejax.train.step`: optimizer, state layout, init, jitted train step), run under the mesh."""
from __future__ import annotations


def tiny_config(**moe):
  """Small MoE LM: a dense layer then an MoE layer (8 experts in 4 groups, K = k_group·k_expert = 4);
  capacity_factor 8 so nothing drops. lr 1e-2 from step 0 (no warmup) so 3 steps move the loss."""
  from litejax.config import Config, ModelConfig, MoEConfig, TrainConfig
  moe_kw = dict(num_tiers=1, groups_per_tier=4, experts_per_group=2, k_group=2, k_expert=2, d_expert=32,
                capacity_factor=8.0)
  moe_kw.update(moe)
  return Config(model=ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16,
                                  vocab_size=64, d_ff=64, moe_every=2),
                moe=MoEConfig(**moe_kw), train=TrainConfig(lr=1e-2, warmup_steps=0, steps=100))


def batch(cfg, global_batch: int, step: int):
  import numpy as np
  rng = np.random.default_rng(step)
  return rng.integers(0, cfg.model.vocab_size, (global_batch, cfg.model.seq_len + 1), dtype=np.int32)


def train_losses(cfg, mesh, global_batch: int = 8, steps: int = 3):
  """Cross-entropy before and after each of `steps` updates of `litejax.train.loop.make_train_step`, and
  (single process) the first batch's logits and gradients of that loss as host numpy."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from litejax import sharding
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer

  sharding.validate_mesh(cfg, mesh, global_batch)
  tx = make_optimizer(cfg.train)
  graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
  state = train_step.init_state(cfg, mesh, tx, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, batch_sh)
  logits_sh = sharding.logical_sharding(mesh, ('batch', 'sequence', 'vocab'))

  def ce_and_logits(params, extra, inputs, targets):   # the loss the trainer reports as `loss`
    logits, _ = nnx.merge(graphdef, params, extra)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

  grad_fn = jax.jit(jax.value_and_grad(ce_and_logits, has_aux=True),
                    in_shardings=(shardings['params'], shardings['extra'], batch_sh, batch_sh),
                    out_shardings=((None, logits_sh), shardings['params']))
  losses, first = [], None
  for i in range(steps + 1):       # the last loss is after `steps` updates
    host = batch(cfg, global_batch, i)
    inputs, targets = (jax.make_array_from_callback(a.shape, batch_sh, lambda idx, a=a: a[idx])
                       for a in (np.ascontiguousarray(host[:, :-1]), np.ascontiguousarray(host[:, 1:])))
    with jax.set_mesh(mesh):     # the MoE layers pick local or expert-parallel dispatch from it
      if i == 0 and jax.process_count() == 1:
        (_, logits), grads = grad_fn(state['params'], state['extra'], inputs, targets)
        first = (np.asarray(logits), jax.tree.map(np.asarray, grads))
      state, metrics = step(state, inputs, targets)
    losses.append(float(metrics['loss']))
  return losses, first
