"""The row kernels every dispatch path shares: expert FFNs over packed rows, the slot-major queue
position of each assignment, packing token rows into buffer slots and back, and the weighted combine.

litejax.model.moe.dispatch (capacity, gather, einsum), .dropless, .expert_parallel, .router_parallel
and the store's slot buffers (litejax.inference.store.slot_moe) are each a composition of these, so all
of them compute bit-identical expert outputs on the same rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from litejax.config import MoEConfig


# The capacity buffer's per-expert matmuls: [E, C, a] x [E, a, b] -> [E, C, b].
_BATCHED_EXPERT_SPECS = ('ecd,edh->ech', 'ech,ehd->ecd')

# With many experts and at most this many rows each, XLA:CPU's batched dot runs the backward's
# transposed matmuls slower than a loop of per-expert 2-D matmuls (experiments/profile_moe.py
# measures the expert MLP's fwd+bwd both ways at E = 1024). With few experts the loop loses
# (experiments/bench_train.py, tiny's 16 experts on 8 emulated devices).
_CPU_LOOP_MAX_ROWS = 128
_CPU_LOOP_MIN_EXPERTS = 128


def _bwd_batched(x_eca, w_eab, g_ecb):
  return jnp.einsum('ecb,eab->eca', g_ecb, w_eab), jnp.einsum('eca,ecb->eab', x_eca, g_ecb)


def _bwd_per_expert(x_eca, w_eab, g_ecb):
  def one_expert(args):
    x_ca, w_ab, g_cb = args
    return g_cb @ w_ab.T, x_ca.T @ g_cb
  return jax.lax.map(one_expert, (x_eca, w_eab, g_ecb))


@jax.custom_vjp
def expert_matmul(x_eca: jax.Array, w_eab: jax.Array) -> jax.Array:
  """Per-expert matmul [E, C, a] x [E, a, b] -> [E, C, b]: one batched dot forward.

  The backward is the same math; when lowered for CPU with many experts (>= 128) of few rows
  (<= 128) it loops over experts, where XLA:CPU's batched dot with a transposed operand is slow;
  other platforms (and AOT lowering for TPU from this host) keep the batched dots.
  """
  return jnp.einsum('eca,eab->ecb', x_eca, w_eab)


def _expert_matmul_fwd(x_eca, w_eab):
  return expert_matmul(x_eca, w_eab), (x_eca, w_eab)


def _varying_axes(x: jax.Array) -> set[str]:
  """Mesh axes a value varies along inside shard_map (empty outside it)."""
  return set(jax.typeof(x).manual_axis_type.varying)


def _sum_to_primal_vma(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Inside shard_map a weight replicated over e.g. the data axis gets a per-rank partial cotangent;
  sum it over the axes the primal does not vary along (what autodiff of an einsum inserts)."""
  extra = _varying_axes(ct) - _varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _expert_matmul_bwd(res, g_ecb):
  x_eca, w_eab = res
  if x_eca.shape[0] < _CPU_LOOP_MIN_EXPERTS or x_eca.shape[1] > _CPU_LOOP_MAX_ROWS:
    dx, dw = _bwd_batched(x_eca, w_eab, g_ecb)
  else:
    dx, dw = jax.lax.platform_dependent(x_eca, w_eab, g_ecb, cpu=_bwd_per_expert, default=_bwd_batched)
  return _sum_to_primal_vma(dx, x_eca), _sum_to_primal_vma(dw, w_eab)


expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return expert_matmul(a, b) if spec in _BATCHED_EXPERT_SPECS else jnp.einsum(spec, a, b)


def expert_ffn(x: jax.Array, w: dict[str, jax.Array], kind: str, in_spec: str, out_spec: str) -> jax.Array:
  """Applies expert FFNs with einsum specs for the two matmuls (e.g. 'ecd,edh->ech', 'ech,ehd->ecd').

  kind 'mlp': relu(x·W_in)·W_out (the spec's two-layer MLP); 'glu': (silu(x·W_gate) ⊙ x·W_in)·W_out.
  """
  with jax.named_scope('experts'):   # names the FLOPs for litejax.analysis.bound
    h = _matmul(in_spec, x, w['w_in'].astype(x.dtype))
    if kind == 'glu':
      h = jax.nn.silu(_matmul(in_spec, x, w['w_gate'].astype(x.dtype))) * h
    else:
      h = jax.nn.relu(h)
    return _matmul(out_spec, h, w['w_out'].astype(x.dtype))


def assignment_positions(expert_nk: jax.Array, capacity_per_expert: int):
  """Position of each assignment within its expert's queue (slot-major priority), and keep mask.

  Uses a stable sort over the N·K assignments, never an E-sized or N×E tensor.
  """
  n, k = expert_nk.shape
  flat = expert_nk.T.reshape(-1)                              # slot-major priority order
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  run_start = jnp.searchsorted(sorted_e, sorted_e, side='left')
  pos_sorted = jnp.arange(n * k, dtype=jnp.int32) - run_start.astype(jnp.int32)
  pos = jnp.zeros((n * k,), jnp.int32).at[order].set(pos_sorted)
  pos_nk = pos.reshape(k, n).T
  return pos_nk, pos_nk < capacity_per_expert


def drop_fractions(keep_nk: jax.Array, cfg: MoEConfig) -> jax.Array:
  """Dropped fraction per level [tier, group, expert]: a kept tier (group) branch counts as dropped
  when every assignment under it was dropped. Pooled selection has no per-group assignments: its group
  figure is the tier's (the pool)."""
  n = keep_nk.shape[0]
  dropped = ~keep_nk
  tier = dropped.reshape(n, cfg.k_tier, -1).all(-1).mean()
  visits = cfg.k_tier if cfg.expert_selection == 'pooled' else cfg.k_tier * cfg.k_group
  group = dropped.reshape(n, visits, -1).all(-1).mean()
  return jnp.stack([tier, group, dropped.mean()]).astype(jnp.float32)


def pack_rows(x_nd: jax.Array, slot_ni: jax.Array, total: int) -> jax.Array:
  """Gathers token rows into `total` buffer slots: [N, d] -> [total, d].

  slot_ni: [N, I] the slot of each of a token's I items, `total` for a dropped item. Empty slots
  read an appended zero row; each token row is read once per slot (no [N, I, d] scatter).
  """
  n, d = x_nd.shape
  token_ni = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], slot_ni.shape)
  token_of_slot = jnp.full((total + 1,), n, jnp.int32).at[slot_ni.reshape(-1)].set(token_ni.reshape(-1))
  x_pad = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])
  return x_pad[token_of_slot[:total]]


def unpack_rows(y_md: jax.Array, slot_ni: jax.Array) -> jax.Array:
  """Reads each item's result back from its slot: [M, d] -> [N, I, d]; dropped items (slot M) get zero."""
  y_pad = jnp.concatenate([y_md, jnp.zeros((1, y_md.shape[-1]), y_md.dtype)])
  return y_pad[slot_ni]


def combine(y_nkd: jax.Array, weight_nk: jax.Array) -> jax.Array:
  """The weighted sum of a token's K expert outputs (2·K·d FLOPs per token): [N, K, d] -> [N, d]."""
  with jax.named_scope('dispatch'):
    return jnp.einsum('nkd,nk->nd', y_nkd, weight_nk.astype(y_nkd.dtype))


def gather_ffn(x_nd: jax.Array, expert_nk: jax.Array, w: dict[str, jax.Array], kind: str) -> jax.Array:
  """[N, K, d]: expert expert_nk[n, k] on token n, each assignment gathering its expert's weight
  slices (the `gather` path; dropless decode on CPU)."""
  return gathered_weights_ffn(x_nd, {name: v[expert_nk] for name, v in w.items()}, kind)


def gathered_weights_ffn(x_nd: jax.Array, w_nk: dict[str, jax.Array], kind: str) -> jax.Array:
  """[N, K, d] from per-assignment weights w_nk ([N, K, d, h] / [N, K, h, d]): the one arithmetic of
  `gather_ffn`, shared with the slot buffers (litejax.inference.store.slot_moe) so that both are bit-identical."""
  return expert_ffn(x_nd, w_nk, kind, 'nd,nkdh->nkh', 'nkh,nkhd->nkd')
