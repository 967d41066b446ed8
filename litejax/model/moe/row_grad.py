"""Gradients of the touched rows of a table ([E, ...] expert or router weights), never of the table.

A JAX cotangent always has its primal's shape, so differentiating a loss with respect to an [E, d, h]
expert table writes an [E, d, h] gradient (the backward of a gather is a scatter-add into a zero table),
even when a step touches u ≪ E experts. The trick used here: leave the table undifferentiated, gather the
u touched rows, add a zero-valued [u, d, h] perturbation and differentiate with respect to the
perturbation. Its gradient is the touched rows' gradient, and the compiled backward holds nothing of the
table's size (tests/test_sparse_grad.py reads the optimized HLO to check it).

Conventions shared with litejax/sparse_optim.py:
  - u is static: the number of distinct rows a step can touch, min(E, assignments) (`touched_bound`).
  - Unused entries of an [u] id list hold the padding id E (one past the last row). `gather_rows` of a
    padding id reads zeros (`touched_rows` / `slot_rows` a clamped row nothing uses) and scatters to it
    are dropped, so padded rows never change anything.
  - Ids in an [u] list are distinct apart from padding (scatters of duplicate ids are ill-defined);
    `unique_ids` builds such a list from per-assignment ids, `sum_rows` sums per-assignment
    contributions onto it.

Cost: `unique_ids` sorts the n assignment ids (O(n log n)); nothing here is O(E).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp


def touched_bound(num_rows: int, assignments: int) -> int:
  """Static bound u on the distinct rows touched by `assignments` ids into a table of `num_rows` rows."""
  if num_rows < 1 or assignments < 0:
    raise ValueError(f'touched_bound: need num_rows >= 1 and assignments >= 0, got {num_rows}, {assignments}')
  return max(1, min(num_rows, assignments))


def unique_ids(ids_n: jax.Array, u: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Distinct ids of n assignments, padded to a static u, and each assignment's slot among them.

  ids_n: int [n] row ids in [0, num_rows]; num_rows (or more) marks an unused assignment.
  Returns (ids_u int32 [u] ascending, padded with num_rows; slot_n int32 [n] index into ids_u of each
  assignment, u for unused assignments). u must be >= min(n, num_rows) so no touched row is lost.
  """
  n = ids_n.shape[0]
  if u < min(n, num_rows):
    raise ValueError(f'unique_ids: u = {u} must be >= min(n, num_rows) = {min(n, num_rows)} '
                     f'(n = {n} assignments, num_rows = {num_rows}), or touched rows would be lost')
  ids_n = jnp.minimum(ids_n.astype(jnp.int32), num_rows)   # every padding value becomes num_rows
  order_n = jnp.argsort(ids_n)
  sorted_n = ids_n[order_n]
  first_n = jnp.concatenate([jnp.ones((1,), bool), sorted_n[1:] != sorted_n[:-1]])
  # Padding sorts last, so the valid ids occupy slots 0 .. (distinct valid ids - 1) < u.
  slot_sorted_n = jnp.where(sorted_n < num_rows, jnp.cumsum(first_n) - 1, u).astype(jnp.int32)
  ids_u = jnp.full((u,), num_rows, jnp.int32).at[slot_sorted_n].set(sorted_n, mode='drop')
  slot_n = jnp.zeros((n,), jnp.int32).at[order_n].set(slot_sorted_n)
  return ids_u, slot_n


def sum_rows(grads_n: jax.Array, slot_n: jax.Array, u: int) -> jax.Array:
  """Per-assignment contributions [n, ...] summed per slot into [u, ...]; slot u (unused) is dropped."""
  return jax.ops.segment_sum(grads_n, slot_n, num_segments=u)


def dedup_rows(ids_n: jax.Array, grads_n: jax.Array, u: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(ids_u [u], grads_u [u, ...]): distinct touched rows with their per-assignment gradients summed."""
  ids_u, slot_n = unique_ids(ids_n, u, num_rows)
  return ids_u, sum_rows(grads_n, slot_n, u)


# Whether held 16-bit float tables are read and written as their uint16 bits (`as_bits`). On for XLA:CPU,
# which emulates bf16 (it converts whole tables to f32 around a gather or scatter of bf16 values); off
# where bf16 is native: the TPU compiler lays uint16 out unlike bf16 and copies every table through the
# bitcasts (docs/training.md "Sparse expert updates" has the shrunk quadrillion step on v5p).
_BITS_VIEW = contextvars.ContextVar('litejax_bits_view', default=True)


@contextlib.contextmanager
def bits_view(on: bool):
  """Within the block (while tracing), `as_bits` views 16-bit float tables as uint16 (`on`) or not."""
  token = _BITS_VIEW.set(bool(on))
  try:
    yield
  finally:
    _BITS_VIEW.reset(token)


def bits_view_for(platform: str) -> bool:
  """Whether a program compiled for `platform` ('cpu', 'tpu', 'gpu') should use the uint16 bits view."""
  return platform == 'cpu'


def as_bits(x: jax.Array) -> jax.Array:
  """A 16-bit float array viewed as uint16 (other dtypes, or with `bits_view` off, unchanged);
  `from_bits` undoes it."""
  if _BITS_VIEW.get() and x.dtype in (jnp.bfloat16, jnp.float16):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_bits(x: jax.Array, dtype) -> jax.Array:
  """The `dtype` array whose bits a uint16 array holds (`as_bits`); any other array unchanged."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def take_rows(table: jax.Array, ids: jax.Array, mode: str = 'clip') -> jax.Array:
  """table[ids] (`mode` as `.at[].get`; 'fill' reads zeros). A bf16/f16 table is gathered as its uint16
  bits: XLA:CPU emulates bf16, and it hoists the f32 convert of a gathered bf16 operand over the whole
  table (an f32 copy of the table per step, in the scan's loop state); bits are gathered as they are.
  Bit-identical, and free where bf16 is native (a bitcast). Not differentiable: for held tables."""
  rows = as_bits(table).at[ids].get(mode=mode, fill_value=0 if mode == 'fill' else None)
  return jax.lax.bitcast_convert_type(rows, table.dtype) if rows.dtype != table.dtype else rows


def put_rows(table: jax.Array, ids: jax.Array, rows: jax.Array) -> jax.Array:
  """table.at[ids].set(rows, mode='drop'), a bf16/f16 table as its uint16 bits (see `take_rows`: XLA:CPU
  would otherwise convert the whole table to f32 around the scatter, twice)."""
  rows = rows.astype(table.dtype)
  out = as_bits(table).at[ids].set(as_bits(rows), mode='drop')
  return jax.lax.bitcast_convert_type(out, table.dtype) if out.dtype != table.dtype else out


def gather_rows(table: jax.Array, ids_u: jax.Array) -> jax.Array:
  """table[ids_u] with zeros for padding ids (>= table.shape[0])."""
  return table.at[ids_u].get(mode='fill', fill_value=0)   # differentiable: not through the bits view


def touched_rows(table: jax.Array, ids_u: jax.Array, delta_u: jax.Array) -> jax.Array:
  """The touched rows table[ids_u] + delta_u, differentiable in delta_u only.

  Pass delta_u = zeros [u, ...] (`zero_delta`) and take the gradient with respect to it: that gradient
  is d loss / d table[ids_u] (summed over every use of a row), and no [E, ...] cotangent is formed
  because the table is held constant.
  """
  if delta_u.shape != ids_u.shape + table.shape[1:]:
    raise ValueError(f'touched_rows: delta_u shape {delta_u.shape} must be ids_u shape + row shape '
                     f'{ids_u.shape + table.shape[1:]}')
  # A padding id reads a clamped real row, not zeros: no row of the result with a padding id is used
  # by any assignment (and its delta's gradient is zero), so the fill mask - a select over every
  # gathered element - would buy nothing.
  return take_rows(jax.lax.stop_gradient(table), ids_u) + delta_u.astype(table.dtype)


def slot_rows(rows_u: jax.Array, slot_m: jax.Array) -> jax.Array:
  """rows_u[slot_m] for slots whose unused entries (slot u) carry zero activations: those read a clamped
  row (finite, multiplied by zeros) instead of a zero row, saving a select per gathered element."""
  return rows_u.at[slot_m].get(mode='clip')


def zero_delta(table: jax.Array | jax.ShapeDtypeStruct, u: int, dtype=jnp.float32) -> jax.Array:
  """The zero perturbation [u, *row_shape] to differentiate with respect to (f32 by default)."""
  return jnp.zeros((u,) + tuple(table.shape[1:]), dtype)
