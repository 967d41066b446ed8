"""A tiny sharded model and optimizer step shared by the sharding tests (the multi-process run uses
the real trainer: tests/test_train_multiprocess.py)."""
from __future__ import annotations



def tiny_config(**moe):
  """Small MoE LM: a dense layer then an MoE layer (8 experts in 4 groups, K = k_group·k_expert = 4);
  capacity_factor 8 so nothing drops."""
  from litejax.config import Config, ModelConfig, MoEConfig
  moe_kw = dict(num_tiers=1, groups_per_tier=4, experts_per_group=2, k_group=2, k_expert=2, d_expert=32,
                capacity_factor=8.0)
  moe_kw.update(moe)
  return Config(model=ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16,
                                  vocab_size=64, d_ff=64, moe_every=2),
                moe=MoEConfig(**moe_kw))


def make_step(cfg, mesh, global_batch: int, lr: float = 1e-2):
  """(graphdef, params, opt_state, step) with `step(params, opt, tokens) -> (params, opt, loss, logits, grads)`
  jitted with explicit in/out shardings. Loss = CE + aux_loss_weight·Σ lb + z_loss_weight·z."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from litejax import sharding

  sharding.validate_mesh(cfg, mesh, global_batch)
  graphdef, params = sharding.sharded_init(cfg, mesh, seed=0)
  p_sh = sharding.state_shardings(params, mesh)
  tx = optax.adamw(lr, weight_decay=0.1)
  opt_sh = sharding.tree_shardings_like(jax.eval_shape(tx.init, params), p_sh)
  opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
  expert_fn = sharding.make_expert_fn(mesh, cfg)
  tok_sh = sharding.batch_sharding(mesh)
  logits_sh = sharding.logical_sharding(mesh, ('batch', 'sequence', 'vocab'))
  rep = sharding.logical_sharding(mesh, ())

  def loss_fn(p, tokens):
    logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1], expert_fn=expert_fn)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    loss = ce + cfg.moe.aux_loss_weight * aux['load_balance_loss'].sum() + cfg.moe.z_loss_weight * aux['z_loss']
    return loss, logits

  def step(p, o, tokens):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, tokens)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, logits, grads

  step = jax.jit(step, in_shardings=(p_sh, opt_sh, tok_sh),
                 out_shardings=(p_sh, opt_sh, rep, logits_sh, p_sh), donate_argnums=(0, 1))
  return graphdef, params, opt, step


def batch(cfg, global_batch: int, step: int):
  import numpy as np
  rng = np.random.default_rng(step)
  return rng.integers(0, cfg.model.vocab_size, (global_batch, cfg.model.seq_len + 1), dtype=np.int32)


def train_losses(cfg, mesh, global_batch: int = 8, steps: int = 3):
  """Losses before and after each of `steps` optimizer steps, and (single process) the first
  step's logits and grads as host numpy."""
  import jax
  import numpy as np
  from litejax import sharding

  _, params, opt, step = make_step(cfg, mesh, global_batch)
  tok_sh = sharding.batch_sharding(mesh)
  losses, first = [], None
  for i in range(steps + 1):       # the last loss is after `steps` updates
    host = batch(cfg, global_batch, i)
    tokens = jax.make_array_from_callback(host.shape, tok_sh, lambda idx, h=host: h[idx])
    params, opt, loss, logits, grads = step(params, opt, tokens)
    losses.append(float(loss))
    if i == 0 and jax.process_count() == 1:
      first = (np.asarray(logits), jax.tree.map(np.asarray, grads))
  return losses, first
