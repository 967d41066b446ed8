"""Touched-row gradients: unique ids and per-row sums against NumPy, the perturbation gradient against the dense
gradient and a float64 NumPy gradient, and the compiled backward holding nothing of the table's size."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litejax.model.moe import row_grad as sg

E, D, H, N = 64, 8, 16, 12   # table [E, d, h]; N assignments (duplicates and dropped ones included)


def test_unique_ids_and_sums_match_numpy():
  ids_n = np.array([5, 3, 5, 64, 0, 3, 5, 70, 9, 0, 64, 2], np.int32)   # 64 and 70 = unused assignments
  g_nd = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
  u = 12
  ids_u, slot_n = jax.jit(sg.unique_ids, static_argnums=(1, 2))(ids_n, u, E)
  ids_u, slot_n = np.asarray(ids_u), np.asarray(slot_n)
  valid = ids_n < E
  distinct = np.unique(ids_n[valid])
  np.testing.assert_array_equal(ids_u, np.concatenate([distinct, np.full(u - len(distinct), E)]))
  np.testing.assert_array_equal(ids_u[slot_n[valid]], ids_n[valid])
  np.testing.assert_array_equal(slot_n[~valid], u)
  ref = np.zeros((u, 3), np.float64)
  np.add.at(ref, slot_n[valid], g_nd[valid])
  _, g_u = sg.dedup_rows(jnp.asarray(ids_n), jnp.asarray(g_nd), u, E)
  np.testing.assert_allclose(np.asarray(g_u), ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_u)[:len(distinct)].sum(0), g_nd[valid].sum(0), rtol=1e-5)
  # Every row touched (u = num_rows = n): nothing lost.
  ids_u, _ = sg.unique_ids(jnp.array([2, 0, 1, 3]), 4, 4)
  np.testing.assert_array_equal(np.asarray(ids_u), [0, 1, 2, 3])
  with pytest.raises(ValueError, match='u = 3 must be >= min'):
    sg.unique_ids(jnp.asarray(ids_n), 3, E)
  assert sg.touched_bound(E, N) == N and sg.touched_bound(4, N) == 4


def _toy_loss_sparse(delta_udh, w_edh, ids_u, slot_n, x_nd, c_nh):
  """An MoE-like gather-matmul over assignments, through the touched rows only."""
  rows_udh = sg.touched_rows(w_edh, ids_u, delta_udh)
  w_ndh = sg.gather_rows(rows_udh, slot_n)        # slot u (dropped assignment) reads zeros
  return jnp.sum(jnp.tanh(jnp.einsum('nd,ndh->nh', x_nd, w_ndh)) * c_nh)


def _toy_loss_dense(w_edh, ids_n, x_nd, c_nh):
  w_ndh = sg.gather_rows(w_edh, ids_n)
  return jnp.sum(jnp.tanh(jnp.einsum('nd,ndh->nh', x_nd, w_ndh)) * c_nh)


def _toy_inputs():
  rng = np.random.default_rng(1)
  w = (rng.normal(size=(E, D, H)) / np.sqrt(D)).astype(np.float32)
  ids_n = np.array([7, 3, 7, 40, 3, 7, E, 12, 40, 0, 63, 12], np.int32)   # one dropped assignment (E)
  x = rng.normal(size=(N, D)).astype(np.float32)
  c = rng.normal(size=(N, H)).astype(np.float32)
  return w, ids_n, x, c


def test_perturbation_gradient_equals_dense_touched_rows_and_numpy():
  w, ids_n, x, c = _toy_inputs()
  u = sg.touched_bound(E, N)
  ids_u, slot_n = sg.unique_ids(jnp.asarray(ids_n), u, E)
  g_u = jax.jit(jax.grad(_toy_loss_sparse))(sg.zero_delta(w, u), w, ids_u, slot_n, x, c)
  g_dense = jax.jit(jax.grad(_toy_loss_dense))(w, ids_n, x, c)
  ids_u = np.asarray(ids_u)
  valid_u = ids_u < E
  np.testing.assert_allclose(np.asarray(g_u)[valid_u], np.asarray(g_dense)[ids_u[valid_u]], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_u)[~valid_u], 0)
  # float64 NumPy gradient: d/dw_e sum_n tanh(x_n w_e) c_n = sum over assignments n to e of x_n^T (c_n (1 - tanh²)).
  ref = np.zeros((E, D, H))
  for n, e in enumerate(ids_n):
    if e < E:
      z = np.tanh(x[n].astype(np.float64) @ w[e])
      ref[e] += np.outer(x[n], c[n] * (1 - z ** 2))
  np.testing.assert_allclose(np.asarray(g_u)[valid_u], ref[ids_u[valid_u]], rtol=1e-4, atol=1e-5)
  assert np.all(ref[np.setdiff1d(np.arange(E), ids_u)] == 0)   # the touched rows are all that is non-zero


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%\S+ = (\w+\[[0-9,]*\])\S* (\S+?)\(')


def _table_sized_results(hlo_text: str) -> list[str]:
  """Optimized-HLO instructions producing an f32[E, d, h] array, other than parameters."""
  shape = f'f32[{E},{D},{H}]'
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m and m.group(1) == shape and m.group(2) != 'parameter':
      out.append(line.strip())
  return out


def test_compiled_backward_writes_nothing_of_the_table_size():
  w, ids_n, x, c = _toy_inputs()
  u = sg.touched_bound(E, N)

  def sparse_grad(w_edh, ids_n, x_nd, c_nh):
    ids_u, slot_n = sg.unique_ids(ids_n, u, E)
    return jax.grad(_toy_loss_sparse)(sg.zero_delta(w_edh, u), w_edh, ids_u, slot_n, x_nd, c_nh)

  compiled = jax.jit(sparse_grad).lower(w, ids_n, x, c).compile()
  assert _table_sized_results(compiled.as_text()) == []
  assert compiled.memory_analysis().temp_size_in_bytes < w.nbytes
  # The check can fail: the dense gradient's backward scatters into a table-sized buffer.
  dense = jax.jit(jax.grad(_toy_loss_dense)).lower(w, ids_n, x, c).compile()
  assert _table_sized_results(dense.as_text()) != []


def test_local_capacity_keeps_an_assignment_of_every_routed_expert():
  """The local sparse step reports as touched every expert an assignment names (sparse_grad.unique_ids of
  routing.expert_nk), dropped ones included. That adds no expert without a kept assignment: capacity is at
  least 1 (moe.min_capacity > 0 is validated) and an expert's first assignment in priority order has
  position 0, so an expert whose every assignment is dropped does not exist on this path."""
  from litejax.model.moe import rows
  rng = np.random.default_rng(0)
  expert_nk = jnp.asarray(rng.choice(6, size=(64, 2), p=[0.6, 0.2, 0.1, 0.05, 0.04, 0.01]), jnp.int32)
  _, keep_nk = rows.assignment_positions(expert_nk, 1)   # capacity 1: most assignments dropped
  e, keep = np.asarray(expert_nk).ravel(), np.asarray(keep_nk).ravel()
  assert not keep.all()
  assert set(e[keep]) == set(e)
