"""Row-sparse optimizers: optax equivalence when every row is touched, float64 NumPy references of the lazy
updates, untouched rows bit-identical, in-place updates on donated buffers, planning bytes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from litejax.train import row_optim as so
from litejax.config import from_dict
from litejax.train.optimizer import lr_schedule

E, D, H = 6, 3, 4
TC = from_dict({'train': dict(lr=0.05, warmup_steps=2, steps=5, weight_decay=0.1, beta1=0.9, beta2=0.95,
                              grad_clip=1.0)}).train


def _step_grads(rng, step):
  # Gradient scales alternate around the clip threshold so some steps clip and some do not.
  scale = (0.05, 3.0)[step % 2]
  return ({'dense': scale * rng.normal(size=(5, 3)).astype(np.float32),
           'scale': scale * rng.normal(size=(3,)).astype(np.float32)},
          scale * rng.normal(size=(E, D, H)).astype(np.float32))


def test_every_row_touched_equals_optax_adamw_with_shared_clip_and_schedule():
  rng = np.random.default_rng(0)
  dense = {'dense': rng.normal(size=(5, 3)).astype(np.float32), 'scale': np.ones(3, np.float32)}
  table = rng.normal(size=(E, D, H)).astype(np.float32)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731  (as litejax/train.py)
  schedule = lr_schedule(TC)
  # Reference: the dense trainer's chain over all parameters, expert table included.
  ref_tx = optax.chain(optax.clip_by_global_norm(TC.grad_clip),
                       optax.adamw(schedule, b1=TC.beta1, b2=TC.beta2, weight_decay=TC.weight_decay,
                                   mask=decay_mask))
  ref_params = {**dense, 'table': table}
  ref_state = ref_tx.init(ref_params)
  # Split: dense params through optax without clipping, the table through row_adamw, one shared norm.
  dense_tx = optax.adamw(schedule, b1=TC.beta1, b2=TC.beta2, weight_decay=TC.weight_decay, mask=decay_mask)
  row_opt = so.row_optimizer('adamw', TC)
  d_params, d_state, t_params, t_state = dense, dense_tx.init(dense), jnp.asarray(table), row_opt.init(table)
  row_update = jax.jit(row_opt.update)
  clipped = []
  for step in range(5):
    g_dense, g_table = _step_grads(rng, step)
    upd, ref_state = ref_tx.update({**g_dense, 'table': g_table}, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)

    ids_u = np.concatenate([rng.permutation(E), [E, E]]).astype(np.int32)   # all rows + two padding ids
    grads_u = np.where(ids_u[:, None, None] < E, g_table[np.minimum(ids_u, E - 1)], 0).astype(np.float32)
    g_norm = so.global_norm(g_dense, grads_u)
    clipped.append(bool(g_norm >= TC.grad_clip))
    g_dense, grads_u = so.clip_by_norm((g_dense, grads_u), g_norm, TC.grad_clip)
    upd, d_state = dense_tx.update(g_dense, d_state, d_params)
    d_params = optax.apply_updates(d_params, upd)
    t_params, t_state = row_update(t_params, t_state, jnp.asarray(ids_u), grads_u, schedule(step))
  assert any(clipped) and not all(clipped)
  np.testing.assert_allclose(np.asarray(t_params), np.asarray(ref_params['table']), atol=1e-6, rtol=0)
  for k in dense:
    np.testing.assert_allclose(np.asarray(d_params[k]), np.asarray(ref_params[k]), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(t_state.count), 5)


def _np_adamw_rows(p, st, ids, g, lr, b1, b2, eps, wd):
  for i, r in enumerate(ids):
    if r >= len(p):
      continue
    st['count'][r] += 1
    c = st['count'][r]
    st['mu'][r] = b1 * st['mu'][r] + (1 - b1) * g[i]
    st['nu'][r] = b2 * st['nu'][r] + (1 - b2) * g[i] ** 2
    mu_hat, nu_hat = st['mu'][r] / (1 - b1 ** c), st['nu'][r] / (1 - b2 ** c)
    p[r] = p[r] - lr * (mu_hat / (np.sqrt(nu_hat) + eps) + wd * p[r])


def _np_factored_rows(p, st, ids, g, lr, decay, eps, clip, wd):
  for i, r in enumerate(ids):
    if r >= len(p):
      continue
    beta = 1 - (st['count'][r] + 1.0) ** -decay
    st['count'][r] += 1
    g_sq = g[i] ** 2 + eps
    st['v_row'][r] = beta * st['v_row'][r] + (1 - beta) * g_sq.mean(axis=1)
    st['v_col'][r] = beta * st['v_col'][r] + (1 - beta) * g_sq.mean(axis=0)
    v_hat = np.outer(st['v_row'][r], st['v_col'][r]) / st['v_row'][r].mean()
    u = g[i] / np.sqrt(v_hat)
    u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / clip)
    p[r] = p[r] - lr * (u + wd * p[r])


KINDS = {
    'adamw': (lambda: so.row_adamw(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
              lambda p, st, ids, g, lr: _np_adamw_rows(p, st, ids, g, lr, 0.9, 0.95, 1e-8, 0.1)),
    'factored': (lambda: so.row_factored(decay_rate=0.8, eps=1e-30, clip_threshold=1.0, weight_decay=0.1),
                 lambda p, st, ids, g, lr: _np_factored_rows(p, st, ids, g, lr, 0.8, 1e-30, 1.0, 0.1)),
}


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_lazy_update_matches_numpy_and_leaves_untouched_rows_bit_identical(kind):
  make, np_update = KINDS[kind]
  opt = make()
  rng = np.random.default_rng(1)
  E8 = 8
  table = rng.normal(size=(E8, D, H)).astype(np.float32)
  state = opt.init(jnp.asarray(table))
  ref_p = table.astype(np.float64)
  ref_st = {k: np.zeros(v.shape, np.float64) for k, v in state._asdict().items()}
  ref_st['count'] = np.zeros(E8, np.int64)
  update = jax.jit(opt.update)
  # Rows touched per step (padding id 8 = unused): row 0 every step, row 7 never, others in between.
  touched = [[0, 2, 5, 8], [3, 0, 8, 8], [5, 0, 1, 2]]
  t, st = jnp.asarray(table), state
  for step, ids in enumerate(touched):
    g = rng.normal(size=(4, D, H)).astype(np.float32)
    lr = 0.01 * (step + 1)
    before = [np.asarray(x).copy() for x in (t, *st)]
    t, st = update(t, st, jnp.asarray(ids, jnp.int32), g, lr)
    np_update(ref_p, ref_st, ids, g.astype(np.float64), lr)
    untouched = [r for r in range(E8) if r not in ids]
    for old, new in zip(before, (t, *st)):
      np.testing.assert_array_equal(np.asarray(new)[untouched], old[untouched])   # bit-identical
  np.testing.assert_allclose(np.asarray(t), ref_p, rtol=1e-5, atol=1e-6)
  for k, v in st._asdict().items():
    np.testing.assert_allclose(np.asarray(v), ref_st[k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(np.asarray(st.count), [3, 1, 2, 1, 0, 2, 0, 0])
  np.testing.assert_array_equal(np.asarray(t)[7], table[7])


def test_factored_every_row_touched_equals_optax_adafactor_per_expert():
  # optax.adafactor without parameter scaling factors each [d, h] expert the same way (weight decay 0,
  # because optax's is not scaled by lr).
  rng = np.random.default_rng(2)
  table = rng.normal(size=(E, D, H)).astype(np.float32)
  ref_tx = optax.adafactor(0.03, min_dim_size_to_factor=1, multiply_by_parameter_scale=False,
                           clipping_threshold=1.0, decay_rate=0.8, eps=1e-30)
  ref_p = {str(e): jnp.asarray(table[e]) for e in range(E)}
  ref_st = ref_tx.init(ref_p)
  opt = so.row_factored(decay_rate=0.8, eps=1e-30, clip_threshold=1.0, weight_decay=0.0)
  t, st = jnp.asarray(table), opt.init(jnp.asarray(table))
  update = jax.jit(opt.update)
  for _ in range(3):
    g = rng.normal(size=(E, D, H)).astype(np.float32)
    upd, ref_st = ref_tx.update({str(e): jnp.asarray(g[e]) for e in range(E)}, ref_st, ref_p)
    ref_p = optax.apply_updates(ref_p, upd)
    t, st = update(t, st, jnp.arange(E, dtype=jnp.int32), g, 0.03)
  np.testing.assert_allclose(np.asarray(t), np.stack([np.asarray(ref_p[str(e)]) for e in range(E)]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', ['adamw', 'factored'])
def test_update_is_in_place_on_donated_buffers(kind):
  """No buffer of the table's size besides the donated inputs aliased to the outputs, at any E."""
  u, d, h = 4, 8, 16
  temps = []
  for num_rows in (64, 256):
    opt = so.row_optimizer(kind, TC)
    table = jax.ShapeDtypeStruct((num_rows, d, h), jnp.float32)
    state = jax.eval_shape(opt.init, table)
    compiled = jax.jit(opt.update, donate_argnums=(0, 1)).lower(
        table, state, jax.ShapeDtypeStruct((u,), jnp.int32), jax.ShapeDtypeStruct((u, d, h), jnp.float32),
        jnp.float32(1e-3)).compile()
    mem = compiled.memory_analysis()
    donated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((table, state)))
    assert mem.alias_size_in_bytes == donated
    assert mem.temp_size_in_bytes < table.size * 4   # all temporaries together smaller than one table
    temps.append(mem.temp_size_in_bytes)
  assert temps[0] == temps[1]   # temporaries follow u, not E


def test_planning_bytes_per_expert():
  d, h = 1024, 256
  # bf16 params (2 B) + f32 state (4 B): AdamW 2 moments of d·h; factored d + h per matrix; 4 B count each.
  assert so.row_state_bytes((d, h), 'adamw') == 2 * d * h + 8 * d * h + 4
  assert so.row_state_bytes((d, h), 'factored') == 2 * d * h + 4 * (d + h) + 4
  assert so.expert_state_bytes(d, h, 'factored', glu=True) == 3 * (2 * d * h + 4 * (d + h) + 4)
  assert so.expert_state_bytes(d, h, 'adamw') == 2 * (10 * d * h + 4)
  with pytest.raises(ValueError, match='train.expert_optimizer'):
    so.row_state_bytes((d, h), 'sgd')
  with pytest.raises(ValueError, match='factored needs a row'):
    so.row_state_bytes((d,), 'factored')


def test_bad_input_errors():
  with pytest.raises(ValueError, match='train.expert_optimizer'):
    so.row_optimizer('adam', TC)
  with pytest.raises(ValueError, match='ndim >= 3'):
    so.row_factored().init(jnp.zeros((4, 3)))
  opt = so.row_adamw()
  t = jnp.zeros((4, 2, 3))
  with pytest.raises(ValueError, match='grads_u'):
    opt.update(t, opt.init(t), jnp.array([0, 1]), jnp.zeros((2, 3, 2)), 0.1)
  with pytest.raises(ValueError, match='max_norm'):
    so.clip_by_norm(t, jnp.float32(1.0), -1.0)


def test_layer_stacked_tables_update_per_layer_under_vmap():
  """Scanned models hold [L, E, ...] tables: vmap over L equals per-layer updates and stays in place."""
  opt = so.row_optimizer('factored', TC)
  rng = np.random.default_rng(3)
  L, u, num_rows = 2, 3, 64
  table = rng.normal(size=(L, num_rows, D, H)).astype(np.float32)
  ids = np.array([[40, 0, num_rows], [1, 2, 63]], np.int32)
  g = rng.normal(size=(L, u, D, H)).astype(np.float32)
  state = jax.vmap(opt.init)(jnp.asarray(table))
  stacked = jax.jit(jax.vmap(opt.update, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1))
  per_layer = [opt.update(jnp.asarray(table[i]), opt.init(jnp.asarray(table[i])), ids[i], g[i], 0.1)
               for i in range(L)]
  mem = stacked.lower(table, state, ids, g, jnp.float32(0.1)).compile().memory_analysis()
  assert mem.temp_size_in_bytes < table.nbytes // L
  t, st = stacked(jnp.asarray(table), state, ids, g, jnp.float32(0.1))
  for i, (t_i, st_i) in enumerate(per_layer):
    np.testing.assert_allclose(np.asarray(t)[i], np.asarray(t_i), rtol=1e-6)   # eager vs jit rounding
    np.testing.assert_array_equal(np.asarray(st.count)[i], np.asarray(st_i.count))
