"""The MoE block (NNX): hierarchical router + capacity-bounded dispatch + experts (+ shared experts).

Parameters (logical axes in brackets):
  router_tier   [d, T]          ('embed', None)                 only when T > 1
  router_group  [T, d, G]       (None, 'embed', None)           only when G > 1 (and group_score router)
  router_expert [T·G, d, E_g]   ('expert_group', 'embed', None)  (None first when every group is kept)
  w_in/w_gate   [E, d, h]       ('expert', 'embed', 'expert_mlp')
  w_out         [E, h, d]       ('expert', 'expert_mlp', 'embed')
Selection biases (sigmoid scoring, loss-free balancing) are `RouterBias` variables, not Params: the
optimizer never touches them; `MoEBlock.update_bias` (loss-free balancing) does, every level from
its own load.

Tables whose rows a step touches sparsely are `RowParam`s (a Param subclass, so everything that
takes Params takes them): the expert weights, and a router table whose level gathers the kept
parents' rows (router_group when k_tier < T, router_expert when k_tier·k_group < T·G). Sparse
training (litejax.train.sparse_step) attaches zero `RowDelta` perturbations of their touched rows
(`attach_row_deltas`); the block then reads only those rows and reports their ids in `MoEStats.touched`.

Dispatch (local or expert-parallel) follows the ambient mesh: see `litejax.model.moe.expert_parallel.moe_ffn`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from litejax.model.moe import expert_parallel, routing, row_grad as sparse_grad
from litejax.config import Config, MoEConfig
from litejax.model.layers import DTYPES, FFN, param


class RouterBias(nnx.Variable):
  """Selection-only routing bias (not trained by gradients)."""


class RowParam(nnx.Param):
  """A table [rows, ...] (per layer) of which a step touches only some rows: experts, gathered router rows."""


class RowDelta(nnx.Variable):
  """Sparse training: the zero perturbation [u, ...] of a RowParam's touched rows (differentiated)."""


EXPERT_TABLES = ('w_in', 'w_gate', 'w_out')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEStats:
  """What one MoE layer reports. The model stacks them over MoE layers (a leading [L] axis on every
  field), which a scan over layers does by itself."""
  load_balance_loss: jax.Array   # f32 [3] Switch loss per level (tier, group, expert)
  z_loss: jax.Array              # f32 [] router z-loss
  drop_fraction: jax.Array       # f32 [3] dropped fraction per level (`rows.drop_fractions`)
  tokens_per_expert: jax.Array   # int32 [E] assignments per expert before capacity drops
  tokens_per_group: jax.Array    # int32 [T·G] selections per group
  tokens_per_tier: jax.Array     # int32 [T] selections per tier
  # Sparse training only: ids of the rows behind each RowDelta, {'experts' | 'router_group' |
  # 'router_expert': int32 [rows]}, padded with the table's row count (`attach_row_deltas`).
  touched: dict[str, jax.Array] | None = None
  # The router's choice, int32 [N, K] expert ids (Routing.expert_nk), for inspection: decode's with_routing
  # returns it; every other program drops it. None for a dense model.
  expert_ids: jax.Array | None = None

  @classmethod
  def empty(cls, cfg: MoEConfig) -> MoEStats:
    """Stacked stats of zero MoE layers (a dense model)."""
    m = cfg
    return cls(jnp.zeros((0, 3)), jnp.zeros((0,)), jnp.zeros((0, 3)),
               jnp.zeros((0, m.experts_total), jnp.int32),
               jnp.zeros((0, m.num_tiers * m.groups_per_tier), jnp.int32), jnp.zeros((0, m.num_tiers), jnp.int32))


class MoEBlock(nnx.Module):
  """Routed experts for [B, S, d] activations; returns (y [B, S, d], MoEStats)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    m, d = cfg.moe, cfg.model.d_model
    pd = DTYPES[cfg.model.param_dtype]
    self.moe_cfg = m
    self.table_dtype = pd   # sparse training may hand the expert tables in as uint16 bits (sparse_grad.as_bits)
    T, G, Eg, E, h = m.num_tiers, m.groups_per_tier, m.experts_per_group, m.experts_total, m.d_expert
    if T > 1:
      self.router_tier = param(rngs, (d, T), ('embed', None), d)
    if G > 1 and m.group_score == 'router':   # top2_experts scores groups from their experts: no table
      self.router_group = param(rngs, (T, d, G), (None, 'embed', None), d, kind=_row_kind(m.k_tier < T))
    gathered = m.router_expert_visits < T * G   # split by group over expert ranks only then (router_parallel)
    self.router_expert = param(rngs, (T * G, d, Eg), ('expert_group' if gathered else None, 'embed', None), d,
                               kind=_row_kind(gathered))
    self.w_in = param(rngs, (E, d, h), ('expert', 'embed', 'expert_mlp'), d, pd, kind=RowParam)
    if m.expert_kind == 'glu':
      self.w_gate = param(rngs, (E, d, h), ('expert', 'embed', 'expert_mlp'), d, pd, kind=RowParam)
    self.w_out = param(rngs, (E, h, d), ('expert', 'expert_mlp', 'embed'), h, pd, kind=RowParam)
    if m.num_shared_experts:
      self.shared = FFN(d, m.num_shared_experts * m.resolved_d_shared, m.expert_kind, rngs, pd)
    if m.score == 'sigmoid':
      self.bias_tier = RouterBias(jnp.zeros((T,), jnp.float32), logical_axes=(None,))
      self.bias_group = RouterBias(jnp.zeros((T * G,), jnp.float32), logical_axes=(None,))
      self.bias_expert = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=('expert',))

  def attach_row_deltas(self, rows: dict[str, int], split_router: bool = False) -> None:
    """Sparse training: zero RowDelta perturbations for this block's RowParams.

    rows: {'experts': rows of the expert deltas (u, or R_b·u on a mesh), 'router_group' / 'router_expert':
    u of that table (R_b·u when split_router)}. Each delta is [*layers, rows, *row shape] (a scanned block
    keeps its leading axis); expert deltas, and router_expert's when split_router (the table split by group
    over expert ranks, litejax.model.moe.router_parallel), are split over the batch axes like the tokens whose rows they are.
    """
    for name in EXPERT_TABLES + ('router_group', 'router_expert'):
      table = getattr(self, name, None)
      if not isinstance(table, RowParam):
        continue
      key = 'experts' if name in EXPERT_TABLES else name
      lead = table.shape[:table.ndim - 3]
      axes = table.get_metadata()['logical_axes']
      split = key == 'experts' or (key == 'router_expert' and split_router)
      axes = (('batch',) + axes[1:]) if split else (None,) * 3
      # In the table's dtype: the forward adds it to rows of that dtype, so an f32 delta's gradient would
      # hold the same values in twice the bytes.
      value = jnp.zeros(lead + (rows[key],) + table.shape[table.ndim - 2:], table.dtype)
      setattr(self, 'delta_' + name, RowDelta(value, logical_axes=('layers',) * len(lead) + axes))

  def _row_deltas(self) -> dict[str, jax.Array]:
    return {name: getattr(self, 'delta_' + name)[...] for name in EXPERT_TABLES + ('router_group', 'router_expert')
            if hasattr(self, 'delta_' + name)}

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
    return {k: sparse_grad.from_bits(v, self.table_dtype) for k, v in out.items()}

  # The layer is route -> routed_experts -> add_shared; litejax.model.transformer.Block composes them with
  # its residual, and the expert store's runtime runs its own experts between `route` and `add_shared`.

  def route(self, x_nd: jax.Array, tier_mask: jax.Array | None = None) -> routing.Routing:
    """The router's choice for [N, d] tokens (routing.route), reading the router rows of sparse training's
    deltas when attached. tier_mask: optional bool [T], a TierSet: the routing tiers these tokens may use."""
    deltas = self._row_deltas()
    router_deltas = {level: deltas[f'router_{level}'] for level in ('group', 'expert') if f'router_{level}' in deltas}
    return routing.route(x_nd, self.router_params(), self.moe_cfg, self.router_bias(), tier_mask=tier_mask,
                         row_deltas=router_deltas)

  def routed_experts(self, x_nd: jax.Array, r: routing.Routing) -> tuple[jax.Array, MoEStats]:
    """(y [N, d]: the routed experts' combined outputs, MoEStats); local or expert-parallel as the ambient
    mesh says (`jax.set_mesh`)."""
    touched = dict(r.touched or {})
    deltas = self._row_deltas()
    expert_deltas = {name: deltas[name] for name in EXPERT_TABLES if name in deltas}
    with jax.named_scope('dispatch'):   # packing and combine; the expert matmuls inside are 'experts'
      if expert_deltas:
        y_nd, drop_fraction, touched['experts'] = expert_parallel.moe_ffn_touched(
            x_nd, r, self.expert_params(), expert_deltas, self.moe_cfg)
      else:
        y_nd, drop_fraction = expert_parallel.moe_ffn(x_nd, r, self.expert_params(), self.moe_cfg)
    stats = MoEStats(load_balance_loss=r.load_balance_loss, z_loss=r.z_loss, drop_fraction=drop_fraction,
                     tokens_per_expert=r.tokens_per_expert, tokens_per_group=r.tokens_per_group,
                     tokens_per_tier=r.tokens_per_tier, touched=touched or None, expert_ids=r.expert_nk)
    return y_nd, stats

  def add_shared(self, x_nd: jax.Array, y_nd: jax.Array) -> jax.Array:
    """y_nd plus the shared experts' output on x_nd (y_nd itself without shared experts)."""
    if not hasattr(self, 'shared'):
      return y_nd
    with jax.named_scope('shared_experts'):   # scope names the FLOPs for litejax.analysis.bound
      return y_nd + self.shared(x_nd)

  def __call__(self, x_bsd: jax.Array, tier_mask: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
    """Routes and runs the experts (and the shared experts) on [B, S, d] activations.
    tier_mask: optional bool [T], a TierSet (routing.route): the routing tiers these tokens may use."""
    b, s, d = x_bsd.shape
    x_nd = x_bsd.reshape(b * s, d)
    y_nd, stats = self.routed_experts(x_nd, self.route(x_nd, tier_mask))
    return self.add_shared(x_nd, y_nd).reshape(b, s, d).astype(x_bsd.dtype), stats

  def update_bias(self, stats: MoEStats, rate: float) -> None:
    """Loss-free balancing step on every level's selection bias (sigmoid scoring only).

    stats: this block's loads; for a scanned block (biases stacked [L, ...]) stacked the same way.
    """
    if not hasattr(self, 'bias_expert') or rate <= 0:
      return
    step = lambda bias, loads: routing.update_selection_biases(bias, loads, rate, self.moe_cfg)  # noqa: E731
    for _ in range(self.bias_expert[...].ndim - 1):   # one vmap per stacked (scanned) axis
      step = jax.vmap(step)
    new = step(self.router_bias(), stats)
    self.bias_tier[...], self.bias_group[...], self.bias_expert[...] = new['tier'], new['group'], new['expert']


def _row_kind(gathered: bool) -> type[nnx.Param]:
  """A router table is a RowParam when its level gathers the kept parents' rows (scores a subset)."""
  return RowParam if gathered else nnx.Param
