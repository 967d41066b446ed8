"""Capacity-bounded dispatch of routed assignments to experts, and the expert FFNs.

Capacity. N is the number of tokens routed together in one MoE call on one device (expert-parallel:
on one source rank): local_batch · seq_len. Each expert takes at most
C = max(ceil(capacity_factor · N · K / E), min_capacity) assignments. Priority is slot-major: every
token's first assignment is placed before any token's second, and within a slot tokens go in order.
An assignment past its expert's capacity is dropped: it contributes zero and the residual stream
carries the token.

Paths (same outputs on the same routing when nothing is dropped; the same drops everywhere):
  capacity: stable sort by expert -> position in expert -> gather tokens into an [E, C, d] buffer ->
            batched expert matmuls -> gather back and combine. Work E·C rows; no N×E×C tensor.
  gather:   compute follows assignments: each of the N·K assignments gathers its expert's weights.
            Work N·K rows whatever E is (dropped ones are masked, so shapes stay static).
  einsum:   GShard-style one-hot [N, E, C] dispatch/combine einsums; a reference baseline only.
  dropless: no capacity: sort by expert, grouped matmul (litejax.dropless). Decoding always uses it.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from litejax.config import MoEConfig, capacity, resolve_dispatch
from litejax.routing import Routing


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
  with jax.named_scope('experts'):   # names the FLOPs for litejax.cost
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
  when every assignment under it was dropped."""
  n = keep_nk.shape[0]
  dropped = ~keep_nk
  tier = dropped.reshape(n, cfg.k_tier, -1).all(-1).mean()
  group = dropped.reshape(n, cfg.k_tier * cfg.k_group, -1).all(-1).mean()
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


def _capacity_path(x_nd, expert_nk, pos_nk, keep_nk, w, kind, num_experts, cap):
  d = x_nd.shape[-1]
  total = num_experts * cap
  slot_nk = jnp.where(keep_nk, expert_nk * cap + pos_nk, total)
  x_ecd = pack_rows(x_nd, slot_nk, total).reshape(num_experts, cap, d)
  y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  with jax.named_scope('dispatch'):
    return unpack_rows(y_ecd.reshape(total, d), slot_nk)     # [N, K, d]


def gather_ffn(x_nd: jax.Array, expert_nk: jax.Array, w: dict[str, jax.Array], kind: str) -> jax.Array:
  """[N, K, d]: expert expert_nk[n, k] on token n, each assignment gathering its expert's weight
  slices (the `gather` path; dropless decode on CPU)."""
  return gathered_weights_ffn(x_nd, {name: v[expert_nk] for name, v in w.items()}, kind)


def gathered_weights_ffn(x_nd: jax.Array, w_nk: dict[str, jax.Array], kind: str) -> jax.Array:
  """[N, K, d] from per-assignment weights w_nk ([N, K, d, h] / [N, K, h, d]): the one arithmetic of
  `gather_ffn`, shared with the slot buffers (litejax.store.slot_moe) so that both are bit-identical."""
  return expert_ffn(x_nd, w_nk, kind, 'nd,nkdh->nkh', 'nkh,nkhd->nkd')


def _einsum_path(x_nd, expert_nk, pos_nk, keep_nk, weight_nk, w, kind, num_experts, cap):
  with jax.named_scope('dispatch'):
    onehot_nke = jax.nn.one_hot(expert_nk, num_experts, dtype=x_nd.dtype)
    onehot_nkc = jax.nn.one_hot(pos_nk, cap, dtype=x_nd.dtype) * keep_nk[..., None].astype(x_nd.dtype)
    dispatch_nec = jnp.einsum('nke,nkc->nec', onehot_nke, onehot_nkc)
    combine_nec = jnp.einsum('nke,nkc,nk->nec', onehot_nke, onehot_nkc, weight_nk.astype(x_nd.dtype))
    x_ecd = jnp.einsum('nec,nd->ecd', dispatch_nec, x_nd)
  y_ecd = expert_ffn(x_ecd, w, kind, 'ecd,edh->ech', 'ech,ehd->ecd')
  with jax.named_scope('dispatch'):
    return jnp.einsum('nec,ecd->nd', combine_nec, y_ecd)


def moe_ffn(x_nd: jax.Array, routing: Routing, w: dict[str, jax.Array], cfg: MoEConfig,
            dispatch: str | None = None, num_experts: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the routed experts for N tokens on one device. Returns (y [N, d], drop_fraction [3]).

  w: 'w_in' [E, d, h], 'w_out' [E, h, d] and for glu 'w_gate' [E, d, h]. drop_fraction is per
  level (tier, group, expert), see `drop_fractions`. The path is `config.resolve_dispatch`'s.
  num_experts: the layer's E when w holds only some rows of the tables (sparse training: the u
  touched experts, routing.expert_nk their row in w, in the order of their expert ids): the path and
  capacity follow E, the buffers the rows of w.
  """
  n = x_nd.shape[0]
  rows = w['w_in'].shape[0]
  num_experts = num_experts or rows
  if dispatch is not None:
    cfg = dataclasses.replace(cfg, dispatch=dispatch)
  path = resolve_dispatch(cfg, n, num_experts)
  if path == 'dropless':   # no capacity, nothing dropped (litejax.dropless; imported here: it imports us)
    from litejax.dropless import dropless_moe
    return dropless_moe(x_nd, routing.expert_nk, routing.weight_nk, w, cfg.expert_kind), jnp.zeros((3,), jnp.float32)
  cap = capacity(cfg, n, num_experts)
  pos_nk, keep_nk = assignment_positions(routing.expert_nk, cap)
  with jax.named_scope('dispatch'):
    weight_nk = routing.weight_nk * keep_nk
  if path == 'capacity':
    y_nkd = _capacity_path(x_nd, routing.expert_nk, pos_nk, keep_nk, w, cfg.expert_kind, rows, cap)
    y_nd = combine(y_nkd, weight_nk)
  elif path == 'gather':
    y_nd = combine(gather_ffn(x_nd, routing.expert_nk, w, cfg.expert_kind), weight_nk)
  elif path == 'einsum':
    y_nd = _einsum_path(x_nd, routing.expert_nk, pos_nk, keep_nk, weight_nk, w, cfg.expert_kind, rows, cap)
  else:
    raise ValueError(f'moe.dispatch: unknown path {path!r}')
  return y_nd, drop_fractions(keep_nk, cfg)
