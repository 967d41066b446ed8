"""The MoE block (NNX): hierarchical router + capacity-bounded dispatch + experts (+ shared experts).

Parameters (logical axes in brackets):
  router_tier   [d, T]          ('embed', None)                 only when T > 1
  router_group  [T, d, G]       (None, 'embed', None)           only when G > 1
  router_expert [T·G, d, E_g]   ('expert_group', 'embed', None)
  w_in/w_gate   [E, d, h]       ('expert', 'embed', 'expert_mlp')
  w_out         [E, h, d]       ('expert', 'expert_mlp', 'embed')
Selection biases (sigmoid scoring, loss-free balancing) are `RouterBias` variables, not Params: the
optimizer never touches them; `litejax.routing.update_selection_bias` does.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from litejax import dispatch as dispatch_lib
from litejax import routing
from litejax.config import Config
from litejax.layers import DTYPES, FFN, param


class RouterBias(nnx.Variable):
  """Selection-only routing bias (not trained by gradients)."""


class MoEBlock(nnx.Module):
  """Routed experts for [B, S, d] activations; returns (y [B, S, d], aux dict)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    m, d = cfg.moe, cfg.model.d_model
    pd = DTYPES[cfg.model.param_dtype]
    self.moe_cfg = m
    T, G, Eg, E, h = m.num_tiers, m.groups_per_tier, m.experts_per_group, m.experts_total, m.d_expert
    if T > 1:
      self.router_tier = param(rngs, (d, T), ('embed', None), d)
    if G > 1:
      self.router_group = param(rngs, (T, d, G), (None, 'embed', None), d)
    self.router_expert = param(rngs, (T * G, d, Eg), ('expert_group', 'embed', None), d)
    self.w_in = param(rngs, (E, d, h), ('expert', 'embed', 'expert_mlp'), d, pd)
    if m.expert_kind == 'glu':
      self.w_gate = param(rngs, (E, d, h), ('expert', 'embed', 'expert_mlp'), d, pd)
    self.w_out = param(rngs, (E, h, d), ('expert', 'expert_mlp', 'embed'), h, pd)
    if m.num_shared_experts:
      self.shared = FFN(d, m.num_shared_experts * m.resolved_d_shared, m.expert_kind, rngs, pd)
    if m.score == 'sigmoid':
      self.bias_tier = RouterBias(jnp.zeros((T,), jnp.float32), logical_axes=(None,))
      self.bias_group = RouterBias(jnp.zeros((T * G,), jnp.float32), logical_axes=(None,))
      self.bias_expert = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=('expert',))

  def router_params(self) -> dict[str, jax.Array]:
    out = {'expert': self.router_expert[...]}
    if hasattr(self, 'router_tier'):
      out['tier'] = self.router_tier[...]
    if hasattr(self, 'router_group'):
      out['group'] = self.router_group[...]
    return out

  def router_bias(self) -> dict[str, jax.Array] | None:
    if not hasattr(self, 'bias_expert'):
      return None
    return {'tier': self.bias_tier[...], 'group': self.bias_group[...], 'expert': self.bias_expert[...]}

  def expert_params(self) -> dict[str, jax.Array]:
    out = {'w_in': self.w_in[...], 'w_out': self.w_out[...]}
    if hasattr(self, 'w_gate'):
      out['w_gate'] = self.w_gate[...]
    return out

  def __call__(self, x_bsd: jax.Array,
               expert_fn: Callable[..., tuple[jax.Array, dict[str, Any]]] | None = None):
    """expert_fn(x_nd, routing, expert_params, moe_cfg) replaces local dispatch (expert parallel)."""
    b, s, d = x_bsd.shape
    x_nd = x_bsd.reshape(b * s, d)
    r = routing.route(x_nd, self.router_params(), self.moe_cfg, self.router_bias())
    run = expert_fn or dispatch_lib.moe_ffn
    with jax.named_scope('dispatch'):   # packing and combine; the expert matmuls inside are 'experts'
      y_nd, stats = run(x_nd, r, self.expert_params(), self.moe_cfg)
    if hasattr(self, 'shared'):
      with jax.named_scope('shared_experts'):   # scope names the FLOPs for litejax.cost
        y_nd = y_nd + self.shared(x_nd)
    aux = {
        'load_balance_loss': r.load_balance_loss,       # [3] per level
        'z_loss': r.z_loss,
        'drop_fraction': stats['drop_fraction'],        # [3] per level
        'tokens_per_expert': r.tokens_per_expert,       # [E]
    }
    return y_nd.reshape(b, s, d).astype(x_bsd.dtype), aux

  def update_bias(self, tokens_per_expert: jax.Array, rate: float) -> None:
    """Loss-free balancing step on the expert-level selection bias (sigmoid scoring only)."""
    if hasattr(self, 'bias_expert') and rate > 0:
      self.bias_expert[...] = routing.update_selection_bias(self.bias_expert[...], tokens_per_expert, rate)
