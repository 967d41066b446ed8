"""Dense transformer layers (NNX): RMSNorm, RoPE (with YaRN scaling), grouped-query causal attention, FFN.
(DeepSeek's latent attention is litejax.model.mla.)

Every parameter carries `logical_axes` metadata (e.g. ('embed', 'mlp')); litejax.sharding maps those
names onto mesh axes, so nothing here names a physical axis.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litejax.config import ModelConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int,
          dtype=jnp.float32, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A Param (or the Param subclass `kind`) drawn with variance 1/fan_in, tagged with its logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  # Uniform with variance 1/fan_in: compiles far faster on CPU than normal (no erfinv).
  bound = (3.0 / fan_in) ** 0.5
  value = jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
  return kind(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / rms(x) · scale (computed in f32)."""

  def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32, axis: str = 'embed'):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_bshk: jax.Array, positions_bs: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding over the last axis (rotate-half convention)."""
  half = x_bshk.shape[-1] // 2
  return rotate(x_bshk, positions_bs, theta ** (-jnp.arange(half, dtype=jnp.float32) / half))


def rotate(x_bshk: jax.Array, positions_bs: jax.Array, freq: jax.Array, scale: float = 1.0) -> jax.Array:
  """x rotated by position · freq (freq [hd/2], pair i = dims (i, i + hd/2): rotate-half), cos and sin
  scaled by `scale` (YaRN's attention factor; 1: plain RoPE)."""
  angle = positions_bs[..., None, None].astype(jnp.float32) * freq          # [B, S, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
  x1, x2 = jnp.split(x_bshk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bshk.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention-temperature factor 0.1·mscale·ln(factor) + 1 (1 for factor <= 1; arXiv 2309.00071)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig, dim: int) -> np.ndarray:
  """The rotary frequencies [dim/2] (f32) of `cfg`'s RoPE over `dim` dims: θ^(-2i/dim), or under YaRN
  (model.rope_scaling) blended per pair with the interpolated θ^(-2i/dim)/factor by a linear ramp between
  the dims whose wavelengths turn beta_fast and beta_slow times over rope_original_max_len positions
  (floored/ceiled: transformers' `truncate`): high-frequency pairs keep their frequency, low ones are
  interpolated."""
  base = cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if cfg.rope_scaling == 'none':
    return (1.0 / base).astype(np.float32)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
  keep = 1 - ramp                     # 1: extrapolate (the frequency as trained), 0: interpolate
  return ((1.0 / (cfg.rope_factor * base)) * (1 - keep) + (1.0 / base) * keep).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
  """YaRN's scale of cos and sin: mscale(f, rope_mscale) / mscale(f, rope_mscale_all_dim) when both are
  set, else mscale(f); 1 without rope scaling."""
  if cfg.rope_scaling == 'none':
    return 1.0
  if cfg.rope_mscale and cfg.rope_mscale_all_dim:
    return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
  return yarn_mscale(cfg.rope_factor)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and grouped-query heads (num_kv_heads divides num_heads)."""

  CACHE_KEYS = ('k', 'v')   # its cache entry (litejax.model.kv_cache), in `cached`'s argument order

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.w_q = param(rngs, (d, h, hd), ('embed', 'heads', 'head_dim'), d, pd)
    self.w_k = param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), d, pd)
    self.w_v = param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), d, pd)
    self.w_o = param(rngs, (h, hd, d), ('heads', 'head_dim', 'embed'), h * hd, pd)
    if cfg.qk_norm:   # per-head RMSNorm of q and k over head_dim, before RoPE (Qwen3)
      self.q_norm = RMSNorm(hd, cfg.norm_eps, axis='head_dim')
      self.k_norm = RMSNorm(hd, cfg.norm_eps, axis='head_dim')

  def _qkv(self, x_bsd: jax.Array, positions_bs: jax.Array):
    """q [B, S, KV, groups, hd] and k, v [B, S, KV, hd], RoPE applied at the given positions."""
    cfg, dt = self.cfg, x_bsd.dtype
    b, s, _ = x_bsd.shape
    kv, hd = cfg.num_kv_heads, cfg.resolved_head_dim
    # Scopes name the FLOPs for litejax.analysis.bound (components of litejax.model.bounds).
    with jax.named_scope('attention_proj'):
      q = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_q[...].astype(dt))
      k = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_k[...].astype(dt))
      v = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_v[...].astype(dt))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions_bs, cfg.rope_theta).reshape(b, s, kv, cfg.num_heads // kv, hd)
    return q, rope(k, positions_bs, cfg.rope_theta), v

  def _attend(self, q_bsngk, k_btnk, v_btnk, visible_bst: jax.Array) -> jax.Array:
    """Softmax attention of queries over keys where `visible` [B or 1, S, T], then the output projection."""
    cfg, dt = self.cfg, q_bsngk.dtype
    b, s = q_bsngk.shape[:2]
    hd = cfg.resolved_head_dim
    with jax.named_scope('attention_scores'):
      scores = jnp.einsum('bsngk,btnk->bngst', q_bsngk, k_btnk).astype(jnp.float32) * (hd ** -0.5)
      scores = jnp.where(visible_bst[:, None, None], scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum('bngst,btnk->bsngk', probs, v_btnk).reshape(b, s, cfg.num_heads, hd)
    with jax.named_scope('attention_proj'):
      return jnp.einsum('bshk,hkd->bsd', out, self.w_o[...].astype(dt))

  def __call__(self, x_bsd: jax.Array, positions_bs: jax.Array) -> jax.Array:
    s = x_bsd.shape[1]
    q, k, v = self._qkv(x_bsd, positions_bs)
    return self._attend(q, k, v, jnp.tril(jnp.ones((1, s, s), jnp.bool_)))

  def cached(self, x_bsd: jax.Array, positions_bs: jax.Array, k_cache_btnk: jax.Array,
             v_cache_btnk: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention with a KV cache: writes this call's keys/values at `positions_bs`, then each query at
    position p attends to cache entries 0..p of its row. Returns (out [B, S, d], k_cache, v_cache).

    Every cache entry at or below a query's position must hold that row's keys (written by this call
    or an earlier one); entries above it are masked, so padding and stale rows never leak in.
    """
    q, k, v = self._qkv(x_bsd, positions_bs)
    k_cache_btnk = write_cache(k_cache_btnk, k, positions_bs)
    v_cache_btnk = write_cache(v_cache_btnk, v, positions_bs)
    t = jnp.arange(k_cache_btnk.shape[1], dtype=jnp.int32)
    visible = t[None, None, :] <= positions_bs[:, :, None]
    return self._attend(q, k_cache_btnk, v_cache_btnk, visible), k_cache_btnk, v_cache_btnk


def write_cache(cache_btnk: jax.Array, new_bsnk: jax.Array, positions_bs: jax.Array) -> jax.Array:
  """Writes new_bsnk into cache_btnk at each row's positions (any trailing axes after [B, T]).

  One token per row (decode): a select against the row's position, so rows write at different
  positions without a scatter (XLA partitions a select over a sharded batch trivially). Several tokens
  (prefill): one contiguous block starting at positions_bs[0, 0] for every row.
  """
  new_bsnk = new_bsnk.astype(cache_btnk.dtype)
  if new_bsnk.shape[1] == 1:
    t = jnp.arange(cache_btnk.shape[1], dtype=jnp.int32)
    hit_bt = t[None, :] == positions_bs[:, :1]
    return jnp.where(hit_bt.reshape(hit_bt.shape + (1,) * (cache_btnk.ndim - 2)), new_bsnk, cache_btnk)
  return jax.lax.dynamic_update_slice_in_dim(cache_btnk, new_bsnk, positions_bs[0, 0], axis=1)


class FFN(nnx.Module):
  """Dense FFN: 'mlp' relu(x·W_in)·W_out, or 'glu' (silu(x·W_gate) ⊙ x·W_in)·W_out."""

  def __init__(self, d: int, hidden: int, kind: str, rngs: nnx.Rngs, dtype=jnp.float32,
               hidden_axis: str = 'mlp'):
    self.kind = kind
    self.w_in = param(rngs, (d, hidden), ('embed', hidden_axis), d, dtype)
    if kind == 'glu':
      self.w_gate = param(rngs, (d, hidden), ('embed', hidden_axis), d, dtype)
    self.w_out = param(rngs, (hidden, d), (hidden_axis, 'embed'), hidden, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = x @ self.w_in[...].astype(dt)
    if self.kind == 'glu':
      h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * h
    else:
      h = jax.nn.relu(h)
    return h @ self.w_out[...].astype(dt)
