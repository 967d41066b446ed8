"""Multi-head Latent Attention (NNX), DeepSeek-V2/V3's attention (arXiv 2405.04434 §2.1, 2412.19437 §2.1).

Per token, H heads (nope = qk_nope_head_dim, rope = qk_rope_head_dim, v = v_head_dim, r_q = q_lora_rank,
r_kv = kv_lora_rank):
  q       = x·W_q [d, H, nope+rope], or with r_q > 0 the low rank RMSNorm(x·W_q_a [d, r_q])·W_q_b [r_q, H, nope+rope]
  latent  = RMSNorm(x·W_kv_a[:, :r_kv]) [r_kv]      the compressed key/value: what the KV cache holds
  k_rope  = RoPE(x·W_kv_a[:, r_kv:]) [rope]          one RoPE key shared by every head: cached too
  k_nope, v = latent·W_kv_b [r_kv, H, nope+v]        per head
  score_h = (q_nope·k_nope + RoPE(q_rope)·k_rope) · (nope + rope)^-1/2 · mscale²   (YaRN's, model.rope_scaling)
  out     = Σ_h softmax(score_h)·v_h · W_o [H, v, d]
RoPE covers the rope dims only, rotate-half (litejax.model.layers.rotate); DeepSeek's checkpoints rotate
interleaved pairs (2i, 2i+1), which is the same rotation after permuting the rope columns of W_q(_b) and
W_kv_a to (0, 2, 4, ..., 1, 3, 5, ...): an import does that once (docs/deepseek_v3.md).

Two forms, the same function:
  __call__ (training, a forward over whole sequences): k_nope and v up-projected for every position,
           2·S·H·(nope + rope + v) score FLOPs per token;
  cached   (prefill and decode with a KV cache of T entries): W_kv_b absorbed into the query and the
           output (q_nope·W_uk scores against the latent, the attended latent·W_uv), so no cached
           position is up-projected: 2·T·H·(2·r_kv + rope) score FLOPs per token instead of re-projecting
           the whole cache every step (2·T·r_kv·H·(nope + v)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from litejax.config import ModelConfig
from litejax.model.layers import (DTYPES, RMSNorm, param, rope_attention_factor, rope_frequencies, rotate,
                                  write_cache, yarn_mscale)

# DeepSeek's q_a_layernorm and kv_a_layernorm use RMSNorm's default epsilon, not rms_norm_eps
# (DeepSeek-V3's inference/model.py and transformers' DeepseekV3Attention alike).
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
  """(nope + rope)^-1/2, times mscale(factor, rope_mscale_all_dim)² under YaRN with that mscale set."""
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  if cfg.rope_scaling != 'none' and cfg.rope_mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
  return scale


class MLAttention(nnx.Module):
  """Causal multi-head latent attention (module docstring); the Block calls it as it calls
  litejax.model.layers.Attention."""

  CACHE_KEYS = ('latent', 'k_rope')   # its cache entry (litejax.model.kv_cache), in `cached`'s argument order

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.num_heads
    nope, rope, v, r_q, r_kv = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank,
                                cfg.kv_lora_rank)
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    if r_q:
      self.w_q_a = param(rngs, (d, r_q), ('embed', None), d, pd)
      self.q_norm = RMSNorm(r_q, LATENT_NORM_EPS)
      self.w_q_b = param(rngs, (r_q, h, nope + rope), (None, 'heads', 'head_dim'), r_q, pd)
    else:
      self.w_q = param(rngs, (d, h, nope + rope), ('embed', 'heads', 'head_dim'), d, pd)
    self.w_kv_a = param(rngs, (d, r_kv + rope), ('embed', None), d, pd)
    self.kv_norm = RMSNorm(r_kv, LATENT_NORM_EPS)
    self.w_kv_b = param(rngs, (r_kv, h, nope + v), (None, 'heads', 'head_dim'), r_kv, pd)
    self.w_o = param(rngs, (h, v, d), ('heads', 'head_dim', 'embed'), h * v, pd)

  def _rope(self, x_bshk: jax.Array, positions_bs: jax.Array) -> jax.Array:
    cfg = self.cfg
    freq = jnp.asarray(rope_frequencies(cfg, cfg.qk_rope_head_dim))
    return rotate(x_bshk, positions_bs, freq, rope_attention_factor(cfg))

  def _queries(self, x_bsd: jax.Array, positions_bs: jax.Array):
    """(q_nope [B, S, H, nope], RoPE'd q_rope [B, S, H, rope])."""
    dt, nope = x_bsd.dtype, self.cfg.qk_nope_head_dim
    with jax.named_scope('attention_proj'):   # scopes name the FLOPs for litejax.analysis.bound
      if hasattr(self, 'w_q_a'):
        q_bsr = self.q_norm(jnp.einsum('bsd,dr->bsr', x_bsd, self.w_q_a[...].astype(dt)))
        q = jnp.einsum('bsr,rhk->bshk', q_bsr, self.w_q_b[...].astype(dt))
      else:
        q = jnp.einsum('bsd,dhk->bshk', x_bsd, self.w_q[...].astype(dt))
    return q[..., :nope], self._rope(q[..., nope:], positions_bs)

  def _latent(self, x_bsd: jax.Array, positions_bs: jax.Array):
    """(latent [B, S, r_kv] normalised, RoPE'd shared key [B, S, rope]): one token's cache entry."""
    r_kv = self.cfg.kv_lora_rank
    with jax.named_scope('attention_proj'):
      kv_bsc = jnp.einsum('bsd,dc->bsc', x_bsd, self.w_kv_a[...].astype(x_bsd.dtype))
    k_rope = self._rope(kv_bsc[:, :, None, r_kv:], positions_bs)[:, :, 0]
    return self.kv_norm(kv_bsc[..., :r_kv]), k_rope

  def _softmax(self, scores_bhst: jax.Array, visible_bst: jax.Array, dt) -> jax.Array:
    scores = scores_bhst.astype(jnp.float32) * softmax_scale(self.cfg)
    scores = jnp.where(visible_bst[:, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dt)

  def _output(self, out_bshv: jax.Array) -> jax.Array:
    with jax.named_scope('attention_proj'):
      return jnp.einsum('bshk,hkd->bsd', out_bshv, self.w_o[...].astype(out_bshv.dtype))

  def __call__(self, x_bsd: jax.Array, positions_bs: jax.Array) -> jax.Array:
    """Causal attention over the S tokens themselves, keys and values up-projected per position."""
    dt, s, nope = x_bsd.dtype, x_bsd.shape[1], self.cfg.qk_nope_head_dim
    q_nope, q_rope = self._queries(x_bsd, positions_bs)
    latent_bsc, k_rope_bsk = self._latent(x_bsd, positions_bs)
    with jax.named_scope('attention_proj'):
      kv = jnp.einsum('bsc,chk->bshk', latent_bsc, self.w_kv_b[...].astype(dt))
    with jax.named_scope('attention_scores'):
      scores = (jnp.einsum('bshk,bthk->bhst', q_nope, kv[..., :nope]) +
                jnp.einsum('bshk,btk->bhst', q_rope, k_rope_bsk))
      probs = self._softmax(scores, jnp.tril(jnp.ones((1, s, s), jnp.bool_)), dt)
      out = jnp.einsum('bhst,bthk->bshk', probs, kv[..., nope:])
    return self._output(out)

  def cached(self, x_bsd: jax.Array, positions_bs: jax.Array, latent_cache_btc: jax.Array,
             k_rope_cache_btk: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention with the latent cache: writes this call's latents and RoPE keys at `positions_bs`, then
    each query at position p attends to entries 0..p of its row, with W_kv_b absorbed (module docstring).
    Returns (out [B, S, d], latent cache, k_rope cache); the masking contract is layers.Attention.cached's."""
    dt, nope = x_bsd.dtype, self.cfg.qk_nope_head_dim
    q_nope, q_rope = self._queries(x_bsd, positions_bs)
    latent_bsc, k_rope_bsk = self._latent(x_bsd, positions_bs)
    latent_cache_btc = write_cache(latent_cache_btc, latent_bsc, positions_bs)
    k_rope_cache_btk = write_cache(k_rope_cache_btk, k_rope_bsk, positions_bs)
    w_kv_b = self.w_kv_b[...].astype(dt)
    with jax.named_scope('attention_proj'):
      q_lat = jnp.einsum('bshk,chk->bshc', q_nope, w_kv_b[..., :nope])          # W_uk absorbed into q
    t = jnp.arange(latent_cache_btc.shape[1], dtype=jnp.int32)
    with jax.named_scope('attention_scores'):
      scores = (jnp.einsum('bshc,btc->bhst', q_lat, latent_cache_btc.astype(dt)) +
                jnp.einsum('bshk,btk->bhst', q_rope, k_rope_cache_btk.astype(dt)))
      probs = self._softmax(scores, t[None, None, :] <= positions_bs[:, :, None], dt)
      out_lat = jnp.einsum('bhst,btc->bshc', probs, latent_cache_btc.astype(dt))
    with jax.named_scope('attention_proj'):
      out = jnp.einsum('bshc,chk->bshk', out_lat, w_kv_b[..., nope:])          # W_uv absorbed into o
    return self._output(out), latent_cache_btc, k_rope_cache_btk
