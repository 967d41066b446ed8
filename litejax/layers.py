"""Dense transformer layers (NNX): RMSNorm, RoPE, grouped-query causal attention, FFN.

Every parameter carries `logical_axes` metadata (e.g. ('embed', 'mlp')); litejax.sharding maps those
names onto mesh axes, so nothing here names a physical axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from litejax.config import ModelConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int,
          dtype=jnp.float32) -> nnx.Param:
  """A Param drawn with variance 1/fan_in, tagged with its logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  # Uniform with variance 1/fan_in: compiles far faster on CPU than normal (no erfinv).
  bound = (3.0 / fan_in) ** 0.5
  value = jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / rms(x) · scale (computed in f32)."""

  def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_bshk: jax.Array, positions_bs: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding over the last axis (rotate-half convention)."""
  half = x_bshk.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions_bs[..., None, None].astype(jnp.float32) * freq          # [B, S, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x_bshk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bshk.dtype)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and grouped-query heads (num_kv_heads divides num_heads)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.w_q = param(rngs, (d, h, hd), ('embed', 'heads', 'head_dim'), d, pd)
    self.w_k = param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), d, pd)
    self.w_v = param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), d, pd)
    self.w_o = param(rngs, (h, hd, d), ('heads', 'head_dim', 'embed'), h * hd, pd)

  def __call__(self, x_bsd: jax.Array, positions_bs: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = x_bsd.dtype
    b, s, _ = x_bsd.shape
    kv, hd = cfg.num_kv_heads, cfg.resolved_head_dim
    groups = cfg.num_heads // kv
    # Scopes name the FLOPs for litejax.cost (components of litejax.bounds).
    with jax.named_scope('attention_proj'):
      q = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_q[...].astype(dt))
      k = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_k[...].astype(dt))
      v = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_v[...].astype(dt))
    q = rope(q, positions_bs, cfg.rope_theta).reshape(b, s, kv, groups, hd)
    k = rope(k, positions_bs, cfg.rope_theta)
    with jax.named_scope('attention_scores'):
      scores = jnp.einsum('bsngk,btnk->bngst', q, k).astype(jnp.float32) * (hd ** -0.5)
      causal = jnp.tril(jnp.ones((s, s), jnp.bool_))
      scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum('bngst,btnk->bsngk', probs, v).reshape(b, s, cfg.num_heads, hd)
    with jax.named_scope('attention_proj'):
      return jnp.einsum('bshk,hkd->bsd', out, self.w_o[...].astype(dt))


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
