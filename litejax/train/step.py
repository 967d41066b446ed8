"""The training step on functional NNX state: the state layout and init, the jitted train/eval steps.

The model is split once into a static `graphdef` and array state; the train state is a plain dict

  {'params': nnx.State (Param), 'extra': nnx.State (router selection biases, ...),
   'opt': optax state, 'step': int32 [] (updates done = next batch index), 'rng': uint32 key data}

so one jitted function `(state, inputs, targets) -> (state, metrics)` does a whole update, with the
state donated and explicit in/out shardings from litejax.sharding. Run the steps under
`jax.set_mesh(mesh)`: the MoE layers choose local or expert-parallel dispatch from it.

The loss and the metrics are litejax.train.objective's; the optimizer litejax.train.optimizer's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from litejax import sharding as shd
from litejax.train import sparse_step as sparse_train
from litejax.config import Config
from litejax.model.transformer import abstract_model, build_model, init_compiler_options
from litejax.train.objective import forward_loss, loss_terms, step_metrics, update_bias
from litejax.train.optimizer import make_optimizer


# ---------------------------------------------------------------------------- state

def _new_state(cfg: Config, tx: optax.GradientTransformation, mode: str = 'dense') -> dict[str, Any]:
  model = build_model(cfg, cfg.train.seed)    # the one init convention: init_model(cfg, train.seed)
  _, params, extra = nnx.split(model, nnx.Param, ...)
  return {
      'params': params, 'extra': extra,
      'opt': tx.init(params) if mode == 'dense' else sparse_train.init_opt(cfg, params),
      'step': jnp.zeros((), jnp.int32),
      'rng': initial_rng(cfg.train.seed),
  }


def initial_rng(seed: int) -> jax.Array:
  """The train state's key data at step 0 of a run with `train.seed: seed`. No layer draws randomness today;
  the key is carried (and checkpointed) so one that does (dropout, noisy routing) resumes bit-exactly."""
  return jax.random.key_data(jax.random.key(seed + 1))


def state_layout(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation | None = None):
  """(graphdef, abstract state with shardings attached, shardings pytree) for the current mesh.

  The one way to lay out a model's state: train, eval, checkpoint restore and `litejax.analysis.bound` use it
  (forward-only users take `abstract['params']` and `abstract['extra']`). Nothing is allocated:
  this is also the restore target for checkpoints written on any mesh. tx defaults to
  `make_optimizer(cfg.train)`; with the sparse expert update (`sparse_train.update_mode`) the optimizer
  state is `sparse_train.init_opt`'s instead and tx is not used.
  """
  tx = make_optimizer(cfg.train) if tx is None else tx
  mode = sparse_train.update_mode(cfg, mesh)
  graphdef = nnx.split(abstract_model(cfg), nnx.Param, ...)[0]
  abstract = jax.eval_shape(lambda: _new_state(cfg, tx, mode))
  replicated = NamedSharding(mesh, P())
  params_sh = shd.state_shardings(abstract['params'], mesh)
  shardings = {
      'params': params_sh,
      'extra': shd.state_shardings(abstract['extra'], mesh),
      'opt': (shd.tree_shardings_like(abstract['opt'], params_sh) if mode == 'dense'
              else sparse_train.opt_shardings(abstract['opt'], params_sh)),
      'step': replicated,
      'rng': replicated,
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, shardings


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: Any) -> dict[str, Any]:
  """A fresh train state, each array created directly in its sharding (no host copy)."""
  mode = sparse_train.update_mode(cfg, mesh)
  options = init_compiler_options(mesh.devices.flat[0].platform)
  return jax.jit(lambda: _new_state(cfg, tx, mode), out_shardings=shardings, compiler_options=options)()


def init_opt_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: Any, params: Any) -> Any:
  """A fresh optimizer state for `params` in its shardings: what resuming a checkpoint without one (an
  imported model's weights, litejax.hf) starts from."""
  mode = sparse_train.update_mode(cfg, mesh)
  init = (lambda p: tx.init(p)) if mode == 'dense' else (lambda p: sparse_train.init_opt(cfg, p))
  return jax.jit(init, out_shardings=shardings['opt'])(params)


# ---------------------------------------------------------------------------- steps

def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, shardings: Any,
                    batch_sharding: NamedSharding):
  """The jitted update `(state, inputs [B,S], targets [B,S]) -> (state, metrics)`; state is donated.

  Call (and trace) it under `jax.set_mesh(mesh)`: the MoE layers pick their dispatch from it. With the
  sparse expert update (`sparse_train.update_mode`) it is `sparse_train.make_sparse_train_step`.
  """
  m = cfg.moe

  if sparse_train.update_mode(cfg, batch_sharding.mesh) == 'sparse':
    return sparse_train.make_sparse_train_step(cfg, graphdef, shardings, batch_sharding)

  def loss_fn(params, extra, inputs_bs, targets_bs):
    ce, stats = forward_loss(graphdef, params, extra, inputs_bs, targets_bs)
    loss, (aux_loss, z_loss) = loss_terms(cfg, ce, stats)
    return loss, (ce, aux_loss, z_loss, stats)

  def train_step(state, inputs_bs, targets_bs):
    # Differentiated w.r.t. extra too (its gradient is dropped: the selection biases only pick
    # top-k indices): nnx.scan refuses Variables whose values come from outside the grad trace.
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (total, (ce, aux_loss, z_loss, stats)), (grads, _) = grad_fn(
        state['params'], state['extra'], inputs_bs, targets_bs)
    with jax.named_scope('optimizer'):   # litejax.analysis.bound reports the update's FLOPs and bytes by this scope
      updates, opt = tx.update(grads, state['opt'], state['params'])
      params = optax.apply_updates(state['params'], updates)
    extra = state['extra']
    if m.bias_update_rate > 0 and stats.tokens_per_expert.shape[0]:
      extra = update_bias(graphdef, params, extra, stats, cfg)
    metrics = step_metrics(cfg, ce, total, aux_loss, z_loss, optax.tree.norm(grads), stats)
    state = dict(state, params=params, extra=extra, opt=opt, step=state['step'] + 1)
    return state, metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=(0,))


def make_eval_step(cfg: Config, graphdef, shardings: Any, batch_sharding: NamedSharding):
  """Jitted `(state, inputs, targets) -> mean cross-entropy` (no state change); run it under the mesh."""
  del cfg   # the graphdef holds the config

  def eval_step(state, inputs_bs, targets_bs):
    ce, _ = forward_loss(graphdef, state['params'], state['extra'], inputs_bs, targets_bs)
    return ce

  return jax.jit(eval_step, in_shardings=(shardings, batch_sharding, batch_sharding), out_shardings=None)




@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating leaf of `tree` is finite (a state that may replace a checkpoint)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))
