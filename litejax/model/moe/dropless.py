"""Dropless expert dispatch: every assignment runs, whatever the load (no capacity, no drops).

The A = N·K assignments are sorted by expert; the expert FFN then runs over the sorted rows as a
grouped matmul whose groups are the experts (MaxText / MegaBlocks):
  TPU, GPU: `jax.lax.ragged_dot` over the A sorted rows with per-expert group sizes (the real
            grouped matmul: work A·d·h per matrix).
  CPU:      `ragged_dot` lowers to a dense matmul over every group there (E× the work), so the rows
            are laid out in fixed-size tiles of t rows that each belong to one expert (an expert's
            last tile is zero-padded); each tile gathers its expert's weights and the tiles run as one
            batched matmul. The static tile count (`config.dropless_tiles`) bounds the work by
            (A + min(E, A)·(t - 1))·d·h per matrix, and the weights read by tiles·d·h.
  CPU, t = 1 (a few tokens per step: every decode step): a tile is one row, so the tiles are just the
            assignments in expert order. The sort buys nothing there; each assignment gathers its
            expert's slices directly (`dispatch`'s gather form: no sort, no tiles, no scatter back),
            the same A·d·h work and weights read in far fewer kernels, which at decode set the latency.
No N×E or E-sized tensor is built on the CPU path: run starts come from a search over the sorted ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from litejax.model.moe.capacity import dropless_tiles
from litejax.model.moe.rows import combine, expert_ffn, gather_ffn


def sort_by_expert(expert_nk: jax.Array):
  """Assignments in expert order: (order [A] flat assignment index, sorted expert ids [A], rank of
  each sorted assignment within its expert [A], size of its expert's run [A])."""
  flat = expert_nk.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sorted_e = flat[order]
  start = jnp.searchsorted(sorted_e, sorted_e, side='left').astype(jnp.int32)
  end = jnp.searchsorted(sorted_e, sorted_e, side='right').astype(jnp.int32)
  rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - start
  return order, sorted_e, rank, end - start


def tile_rows(sorted_e: jax.Array, rank: jax.Array, run: jax.Array, tile: int):
  """Row of each sorted assignment in the tiled layout: each expert's run starts on a tile boundary.

  A run of c assignments takes ceil(c / tile)·tile rows; runs are laid out in expert order.
  """
  padded = (run + tile - 1) // tile * tile
  first = rank == 0
  # Rows used by the runs before each run: exclusive cumulative sum over the runs' first elements.
  before = jnp.cumsum(jnp.where(first, padded, 0)) - jnp.where(first, padded, 0)
  run_start = jnp.arange(sorted_e.shape[0], dtype=jnp.int32) - rank
  return before[run_start] + rank


def _tiled_ffn(x_ad: jax.Array, sorted_e: jax.Array, rank: jax.Array, run: jax.Array,
               w: dict[str, jax.Array], kind: str, num_experts: int) -> jax.Array:
  """CPU form: [A, d] expert-sorted rows -> [A, d] outputs via tiles of one expert each."""
  a, d = x_ad.shape
  tile, tiles = dropless_tiles(a, num_experts)
  rows = tiles * tile
  row_a = tile_rows(sorted_e, rank, run, tile)
  # Which sorted assignment fills each row (a = the appended zero row for padding rows).
  source = jnp.full((rows,), a, jnp.int32).at[row_a].set(jnp.arange(a, dtype=jnp.int32))
  x_pad = jnp.concatenate([x_ad, jnp.zeros((1, d), x_ad.dtype)])
  x_tcd = x_pad[source].reshape(tiles, tile, d)
  # Unused trailing tiles keep expert 0: their rows are zero and never read back.
  expert_t = jnp.zeros((tiles,), jnp.int32).at[row_a // tile].set(sorted_e)
  w_t = {name: v[expert_t] for name, v in w.items()}                   # [tiles, d, h] / [tiles, h, d]
  y_tcd = expert_ffn(x_tcd, w_t, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  return y_tcd.reshape(rows, d)[row_a]


def _ragged_ffn(x_ad: jax.Array, sorted_e: jax.Array, w: dict[str, jax.Array], kind: str,
                num_experts: int) -> jax.Array:
  """Grouped-matmul form (TPU/GPU): `ragged_dot` over the expert-sorted rows."""
  sizes = jnp.zeros((num_experts,), jnp.int32).at[sorted_e].add(1)
  dt = x_ad.dtype
  with jax.named_scope('experts'):   # names the FLOPs for litejax.analysis.bound
    def mm(x, name):
      return jax.lax.ragged_dot(x, w[name].astype(dt), sizes)
    h = mm(x_ad, 'w_in')
    h = jax.nn.silu(mm(x_ad, 'w_gate')) * h if kind == 'glu' else jax.nn.relu(h)
    return mm(h, 'w_out')


def expert_rows_ffn(x_ad: jax.Array, expert_a: jax.Array, w: dict[str, jax.Array], kind: str,
                    impl: str = 'auto') -> jax.Array:
  """Runs expert `expert_a[i]` on row i of x_ad for every row (no drops), sorted by expert. Returns [A, d].

  impl: 'tiles' (the bounded CPU form) or 'ragged' (`lax.ragged_dot`).
  """
  num_experts = w['w_in'].shape[0]
  order, sorted_e, rank, run = sort_by_expert(expert_a)
  x_sorted = x_ad[order]
  if impl == 'tiles':
    y_sorted = _tiled_ffn(x_sorted, sorted_e, rank, run, w, kind, num_experts)
  else:
    y_sorted = _ragged_ffn(x_sorted, sorted_e, w, kind, num_experts)
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def cpu_impl(num_assignments: int, num_experts: int) -> str:
  """The CPU form for A assignments over E experts: 'direct' when tiles are one row, else 'tiles'."""
  return 'direct' if dropless_tiles(num_assignments, num_experts)[0] == 1 else 'tiles'


def dropless_moe(x_nd: jax.Array, expert_nk: jax.Array, weight_nk: jax.Array, w: dict[str, jax.Array],
                 kind: str, impl: str = 'auto') -> jax.Array:
  """y [N, d] = Σ_k weight_nk · expert_{expert_nk}(x_n), every assignment computed.

  w: 'w_in' [E, d, h], 'w_out' [E, h, d] and for glu 'w_gate' [E, d, h].
  impl: 'direct' (each assignment gathers its expert's slices), 'tiles', 'ragged', or 'auto': on CPU
  `cpu_impl` (direct at t = 1, tiles beyond), ragged elsewhere; chosen per platform at lowering, as
  rows.expert_matmul does.
  """
  n, k = expert_nk.shape

  def sorted_form(x, e, form):
    x_ad = jnp.repeat(x, k, axis=0)                                    # row n·K + j: token n, slot j
    return expert_rows_ffn(x_ad, e.reshape(-1), w, kind, form).reshape(n, k, -1)

  forms = {'direct': lambda x, e: gather_ffn(x, e, w, kind),
           'tiles': lambda x, e: sorted_form(x, e, 'tiles'),
           'ragged': lambda x, e: sorted_form(x, e, 'ragged')}
  if impl == 'auto':
    cpu = forms[cpu_impl(n * k, w['w_in'].shape[0])]
    y_nkd = jax.lax.platform_dependent(x_nd, expert_nk, cpu=cpu, default=forms['ragged'])
  else:
    y_nkd = forms[impl](x_nd, expert_nk)
  return combine(y_nkd, weight_nk)
