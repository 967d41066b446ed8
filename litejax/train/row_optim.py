"""Row-sparse optimizers for expert and router tables [E, ...]: update only the rows a step touched.

A step touches u ≪ E rows (experts, or router groups). Dense AdamW would read and write every row's
parameters and both moments each step; here an update gathers the u touched rows of the table and its
state, updates them, and scatters them back with `.at[ids].set` — on donated buffers XLA does that in
place, so nothing of the table's size is allocated (tests/test_sparse_optim.py checks the compiled
program). Inputs follow litejax/sparse_grad.py: ids_u int [u] distinct apart from the padding id E, and
grads_u [u, ...] already summed per row (`sparse_grad.dedup_rows`).

Two optimizers:
  - `row_adamw`: lazy AdamW. Moments, bias correction and decoupled weight decay are applied to
    touched rows only, with a per-row step count for the bias correction, so a row touched every step
    follows `optax.adamw` exactly.
  - `row_factored`: Adafactor's factored second moment per row (for an [E, d, h] table, row statistics
    [E, d] and column statistics [E, h]: O(d + h) per expert instead of O(d·h)), no first moment,
    per-row step count for the decay schedule, per-row update clipping, decoupled weight decay.

What the lazy semantics change versus dense AdamW, and why. Dense AdamW decays every weight and keeps
applying every row's momentum on every step, even with a zero gradient: an expert that receives no token
still moves (by its decaying first moment) and shrinks (by weight decay). Here an untouched row's weights
and state are left bit-identical: no weight decay and no momentum drift while it is idle. Its next update
continues from the state it last had, with the bias correction of its own step count. This is what makes
a step's cost O(touched rows) rather than O(E) — decaying E rows is itself an O(E) pass — and it is the
standard choice for sparse tables (lazy Adam in recommender embeddings). The cost: an idle expert is not
pulled toward zero, and the learning rate it sees follows the global schedule, not its own count.

Global-norm clipping and the learning rate are shared with the dense optax path: `global_norm` takes the
dense gradients and the row gradients together, `clip_scale` is optax's clip factor (`clip_by_norm` applies it;
the row updates take it as `grad_scale` and fold it into their scalars), and the
update takes the learning rate as a scalar, `lr_schedule(tc)(step)` from litejax/train.py at the global
step count (what optax's own schedule sees). A train step therefore builds its dense optax chain without
`clip_by_global_norm`, clips both paths with one norm, and passes the same lr to both.

Planning: `row_state_bytes` / `expert_state_bytes` give training-state bytes per row for either optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from litejax.model.moe import row_grad as sparse_grad


OPTIMIZERS = ('adamw', 'factored')


class RowOptimizer(NamedTuple):
  """init(table) -> state; update(table, state, ids_u, grads_u, lr, grad_scale=1) -> (table, state).

  grad_scale multiplies grads_u (the global-norm clip factor, `clip_scale`), folded into the update."""
  init: Callable[[jax.Array], Any]
  update: Callable[..., tuple[jax.Array, Any]]


class RowAdamWState(NamedTuple):
  mu: jax.Array      # [E, ...] first moment
  nu: jax.Array      # [E, ...] second moment
  count: jax.Array   # int32 [E] updates this row has received


class RowFactoredState(NamedTuple):
  v_row: jax.Array   # [E, ..., d] second-moment statistic averaged over the last axis
  v_col: jax.Array   # [E, ..., h] second-moment statistic averaged over the second-to-last axis
  count: jax.Array   # int32 [E] updates this row has received


# ---------------------------------------------------------------------------- shared with the dense path

def global_norm(*trees: Any) -> jax.Array:
  """L2 norm over every leaf of every tree: dense grads and row grads [u, ...] (summed per row) alike."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_scale(g_norm: jax.Array, max_norm: float) -> jax.Array:
  """The factor optax.clip_by_global_norm(max_norm) scales gradients by, given their norm (max_norm 0: 1)."""
  if max_norm < 0:
    raise ValueError(f'clip_by_norm: max_norm must be >= 0 (0 = off), got {max_norm}')
  if max_norm == 0:
    return jnp.ones((), jnp.float32)
  return jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm).astype(jnp.float32)


def clip_by_norm(tree: Any, g_norm: jax.Array, max_norm: float) -> Any:
  """Scale `tree` as optax.clip_by_global_norm(max_norm) would, given the global norm; max_norm 0 = off.

  One scalar factor (`clip_scale`), one multiply per element: optax selects between t and
  (t / norm) · max per element, the same values to rounding at three ops per element."""
  scale = clip_scale(g_norm, max_norm)
  return jax.tree.map(lambda t: t * scale.astype(t.dtype), tree)


def _set_rows(table: jax.Array, ids_u: jax.Array, rows_u: jax.Array) -> jax.Array:
  # mode='drop': padding ids (E) write nothing. A bf16 table scatters its bits (sparse_grad.put_rows).
  return sparse_grad.put_rows(table, ids_u, rows_u)


def _get_rows(table: jax.Array, ids_u: jax.Array) -> jax.Array:
  # A padding id (E) reads a clamped row: whatever the update computes for it is dropped by `_set_rows`,
  # so no per-element fill mask is needed (sparse_grad.gather_rows' zeros cost a select per element).
  return sparse_grad.take_rows(table, ids_u)




def _check_rows(table: jax.Array, ids_u: jax.Array, grads_u: jax.Array, who: str) -> None:
  if ids_u.ndim != 1 or grads_u.shape != ids_u.shape + table.shape[1:]:
    raise ValueError(f'{who}: need ids_u [u] and grads_u [u, *row_shape] = {ids_u.shape + table.shape[1:]}, '
                     f'got ids_u {ids_u.shape} and grads_u {grads_u.shape}')


def _per_row(x_u: jax.Array, ndim: int) -> jax.Array:
  """[u] -> [u, 1, ..., 1] broadcastable against [u, *row_shape]."""
  return x_u.reshape(x_u.shape + (1,) * (ndim - 1))


# ---------------------------------------------------------------------------- lazy AdamW

def row_adamw(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              state_dtype=jnp.float32) -> RowOptimizer:
  """Lazy AdamW on touched rows; the same arithmetic as optax.adamw for a row touched every step."""

  def init(table: jax.Array) -> RowAdamWState:
    return RowAdamWState(jnp.zeros(table.shape, state_dtype), jnp.zeros(table.shape, state_dtype),
                         jnp.zeros(table.shape[:1], jnp.int32))

  def update(table, state: RowAdamWState, ids_u, grads_u, lr, grad_scale=1.0):
    _check_rows(table, ids_u, grads_u, 'row_adamw')
    g = grads_u.astype(state_dtype)
    count_u = _get_rows(state.count, ids_u) + 1
    # The clip factor (`clip_scale`) folds into the scalars: (1 - b1)·(s·g), (1 - b2)·(s·g)².
    scale = jnp.asarray(grad_scale, state_dtype)
    mu_tab = _set_rows(state.mu, ids_u, ((1 - b1) * scale) * g + b1 * _get_rows(state.mu, ids_u))
    nu_tab = _set_rows(state.nu, ids_u, ((1 - b2) * scale * scale) * jnp.square(g) + b2 * _get_rows(state.nu, ids_u))
    # The new moments are read back from the updated tables (u rows) rather than kept: XLA fuses the
    # moment arithmetic into each scatter, and would otherwise repeat it in the parameter update.
    mu, nu = _get_rows(mu_tab, ids_u), _get_rows(nu_tab, ids_u)
    # optax: mu_hat / (sqrt(nu_hat) + eps) with mu_hat = mu / (1 - b1^c), nu_hat = nu / (1 - b2^c); the
    # bias corrections are per-row scalars, so they fold into two [u] factors (the same value to rounding,
    # three ops per element instead of five).
    c = count_u.astype(state_dtype)
    root_c2 = jnp.sqrt(1 - b2 ** c)
    scale_u, eps_u = _per_row(root_c2 / (1 - b1 ** c), g.ndim), _per_row(eps * root_c2, g.ndim)
    p = _get_rows(table, ids_u)
    step = mu * scale_u / (jnp.sqrt(nu) + eps_u)
    # optax: p + (-lr · (step + wd·p)), as p·(1 - lr·wd) - lr·step
    new_p = (p.astype(state_dtype) * (1 - lr * weight_decay) - lr * step).astype(p.dtype)
    new_state = RowAdamWState(mu_tab, nu_tab, _set_rows(state.count, ids_u, count_u))
    return _set_rows(table, ids_u, new_p), new_state

  return RowOptimizer(init, update)


# ---------------------------------------------------------------------------- factored (Adafactor)

def row_factored(decay_rate: float = 0.8, eps: float = 1e-30, clip_threshold: float = 1.0,
                 weight_decay: float = 0.0, state_dtype=jnp.float32) -> RowOptimizer:
  """Adafactor's factored second moment per row of an [E, ..., d, h] table; no first moment.

  For a row touched for the (c+1)-th time (c before this update), with G = g² + eps:
    beta_c = 1 - (c + 1)^-decay_rate   (0 on a row's first update: the statistics start from G)
    v_row = beta_c·v_row + (1 - beta_c)·mean_h(G);  v_col = beta_c·v_col + (1 - beta_c)·mean_d(G)
    u = g / sqrt(v_row ⊗ v_col / mean_d(v_row));  u /= max(1, rms(u) / clip_threshold) per row
    p = p - lr·(u + weight_decay·p)
  As optax.adafactor (multiply_by_parameter_scale=False) factoring the last two axes of each row,
  except that weight decay is decoupled AdamW-style (scaled by lr) to match the dense path.
  """

  def init(table: jax.Array) -> RowFactoredState:
    if table.ndim < 3:
      raise ValueError(f'row_factored: table must be [E, ..., d, h] (ndim >= 3) to factor, got shape {table.shape}')
    return RowFactoredState(jnp.zeros(table.shape[:-1], state_dtype),
                            jnp.zeros(table.shape[:-2] + table.shape[-1:], state_dtype),
                            jnp.zeros(table.shape[:1], jnp.int32))

  def update(table, state: RowFactoredState, ids_u, grads_u, lr, grad_scale=1.0):
    _check_rows(table, ids_u, grads_u, 'row_factored')
    g = grads_u.astype(state_dtype) * jnp.asarray(grad_scale, state_dtype)
    count_u = _get_rows(state.count, ids_u)
    beta = 1 - (count_u + 1).astype(state_dtype) ** -decay_rate
    g_sq = jnp.square(g) + eps
    v_row = _per_row(beta, g.ndim - 1) * _get_rows(state.v_row, ids_u) \
        + _per_row(1 - beta, g.ndim - 1) * jnp.mean(g_sq, axis=-1)
    v_col = _per_row(beta, g.ndim - 1) * _get_rows(state.v_col, ids_u) \
        + _per_row(1 - beta, g.ndim - 1) * jnp.mean(g_sq, axis=-2)
    row_factor = (v_row / jnp.mean(v_row, axis=-1, keepdims=True)) ** -0.5
    upd = g * row_factor[..., :, None] * (v_col ** -0.5)[..., None, :]
    if clip_threshold > 0:
      rms = jnp.sqrt(jnp.mean(jnp.square(upd), axis=tuple(range(1, upd.ndim))))
      upd = upd / _per_row(jnp.maximum(1.0, rms / clip_threshold), upd.ndim)
    p = _get_rows(table, ids_u)
    new_p = p + (-lr * (upd + weight_decay * p.astype(state_dtype))).astype(p.dtype)
    new_state = RowFactoredState(_set_rows(state.v_row, ids_u, v_row), _set_rows(state.v_col, ids_u, v_col),
                                 _set_rows(state.count, ids_u, count_u + 1))
    return _set_rows(table, ids_u, new_p), new_state

  return RowOptimizer(init, update)


def row_optimizer(kind: str, tc: Any) -> RowOptimizer:
  """The row optimizer named by `kind` ('adamw' | 'factored') with a TrainConfig's betas and weight decay."""
  if kind == 'adamw':
    return row_adamw(b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay)
  if kind == 'factored':
    return row_factored(weight_decay=tc.weight_decay)
  raise ValueError(f'train.expert_optimizer: must be one of {OPTIMIZERS}, got {kind!r}')


def state_shardings(table_sharding: Any, state: Any) -> Any:
  """The row state's shardings from its table's NamedSharding: a row's state lives with its row.

  mu, nu: the table's; count [*lead, E]: the table's leading axes; v_row [..., d] / v_col [..., h]:
  the table's spec without its last / second-to-last axis. `state` may be abstract.
  """
  adamw = isinstance(state, RowAdamWState)
  ndim = len(state.mu.shape) if adamw else len(state.v_row.shape) + 1   # the table's rank
  spec = (tuple(table_sharding.spec) + (None,) * ndim)[:ndim]
  named = lambda s: table_sharding.update(spec=jax.sharding.PartitionSpec(*s))  # noqa: E731
  lead = len(state.count.shape)
  if adamw:
    return RowAdamWState(named(spec), named(spec), named(spec[:lead]))
  return RowFactoredState(named(spec[:-1]), named(spec[:-2] + spec[-1:]), named(spec[:lead]))


# ---------------------------------------------------------------------------- planning

def row_state_bytes(row_shape: Sequence[int], optimizer: str, param_bytes: int = 2, state_bytes: int = 4) -> int:
  """Training-state bytes of one row (one expert's slice of one table): parameters + optimizer state.

  adamw: params + two moments of the row's size + a 4-byte count.
  factored: params + row and column statistics (O(d + h) for a [d, h] row) + a 4-byte count.
  Defaults: bf16 parameters, f32 state.
  """
  size = math.prod(row_shape)
  if optimizer == 'adamw':
    return size * param_bytes + 2 * size * state_bytes + 4
  if optimizer == 'factored':
    if len(row_shape) < 2:
      raise ValueError(f'row_state_bytes: factored needs a row of >= 2 axes, got {tuple(row_shape)}')
    lead = math.prod(row_shape[:-2])
    return size * param_bytes + lead * (row_shape[-2] + row_shape[-1]) * state_bytes + 4
  raise ValueError(f'train.expert_optimizer: must be one of {OPTIMIZERS}, got {optimizer!r}')


def expert_state_bytes(d_model: int, d_expert: int, optimizer: str, glu: bool = False,
                       param_bytes: int = 2, state_bytes: int = 4) -> int:
  """Training-state bytes of one expert: w_in [d, h], w_out [h, d] (+ w_gate [d, h] when glu)."""
  shapes = [(d_model, d_expert), (d_expert, d_model)] + ([(d_model, d_expert)] if glu else [])
  return sum(row_state_bytes(s, optimizer, param_bytes, state_bytes) for s in shapes)
