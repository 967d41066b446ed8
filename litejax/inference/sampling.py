"""Next-token sampling: temperature, top-k, top-p (nucleus); greedy at temperature 0.

The settings are traced arrays, not Python constants, so changing them never recompiles the decode
step. Ties at a top-k / top-p threshold keep every tied token.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature (0 = greedy), top_k (0 = off), top_p (1 = off), as scalars (arrays inside jit)."""
  temperature: float | jax.Array = 0.0
  top_k: int | jax.Array = 0
  top_p: float | jax.Array = 1.0

  def validate(self) -> 'Sampling':
    """Raises ValueError naming the setting that is out of range; returns self."""
    if not float(self.temperature) >= 0:
      raise ValueError(f'temperature: must be >= 0 (0 = greedy), got {self.temperature}')
    if int(self.top_k) < 0:
      raise ValueError(f'top_k: must be >= 0 (0 = off), got {self.top_k}')
    if not 0 < float(self.top_p) <= 1:
      raise ValueError(f'top_p: must be in (0, 1] (1 = off), got {self.top_p}')
    return self

  def as_arrays(self) -> 'Sampling':
    return Sampling(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def filter_logits(logits_bv: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
  v = logits_bv.shape[-1]
  sorted_bv = -jnp.sort(-logits_bv, axis=-1)                            # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth_b = jnp.take_along_axis(sorted_bv, jnp.broadcast_to(k - 1, sorted_bv.shape[:-1] + (1,)), axis=-1)
  sorted_bv = jnp.where(jnp.arange(v) < k, sorted_bv, -jnp.inf)
  # Nucleus: keep the smallest prefix of the sorted tokens whose probability reaches top_p.
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = (before_bv < top_p) & jnp.isfinite(sorted_bv)
  floor_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
  floor_b = jnp.maximum(floor_b, kth_b)
  return jnp.where(logits_bv >= floor_b, logits_bv, -jnp.inf)


def sample(logits_bv: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next token per row (int32 [B]): argmax at temperature 0, else a draw from the filtered
  softmax(logits / temperature)."""
  logits_bv = logits_bv.astype(jnp.float32)
  greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  scaled = logits_bv / jnp.maximum(s.temperature, 1e-6)
  drawn_b = jax.random.categorical(key, filter_logits(scaled, s.top_k, s.top_p), axis=-1).astype(jnp.int32)
  return jnp.where(s.temperature > 0, drawn_b, greedy_b)
