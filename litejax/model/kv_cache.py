"""The KV cache: its layout, its shardings and a zeroed cache (the one statement of all three).

Per attention layer an entry {'k', 'v'}, each [B, max_len, KV, hd] in the compute dtype with the logical
axes `CACHE_AXES`, so batch rows split like the activations and kv heads like the attention weights (the
mesh axes come from litejax.sharding.LOGICAL_RULES). Entry t of row b holds the key/value of that row's
token at position t (litejax.model.layers.write_cache writes it, Attention.cached reads it).

The cache is a list over layers in the order `Transformer.__call__(..., cache=)` walks them: for a scanned
model (`model.scan_layers`) one entry per layer of a period, each stacked over the periods on a leading
axis; otherwise one entry per layer. `per_layer=True` lists every layer on its own whatever the model
(the expert store's runtime runs layer by layer). An attention variant with another cache changes
`layer_entry` alone (MLA's latent entry is one).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from litejax import sharding as shd
from litejax.config import Config
from litejax.model.layers import DTYPES

# Logical axes of one cache array (a leading 'layers' axis when stacked over periods).
CACHE_AXES = ('batch', 'sequence', 'kv_heads', 'head_dim')
# MLA's entries (the latent [.., r_kv], the shared RoPE key [.., rope]) have no head axis: whole per row.
LATENT_CACHE_AXES = ('batch', 'sequence', None)


def layer_entry(cfg: Config, batch: int, max_len: int, lead: tuple[int, ...] = ()) -> dict[str, jax.ShapeDtypeStruct]:
  """One attention layer's cache entry as ShapeDtypeStructs (`lead`: leading stacked axes): GQA's
  {'k', 'v'} [B, T, KV, hd]; MLA's {'latent' [B, T, kv_lora_rank], 'k_rope' [B, T, qk_rope_head_dim]}
  (litejax.model.mla: the compressed latent and the shared RoPE key, post-RoPE)."""
  mc = cfg.model
  dt = DTYPES[mc.dtype]
  if mc.attention == 'mla':
    return {'latent': jax.ShapeDtypeStruct(lead + (batch, max_len, mc.kv_lora_rank), dt),
            'k_rope': jax.ShapeDtypeStruct(lead + (batch, max_len, mc.qk_rope_head_dim), dt)}
  shape = lead + (batch, max_len, mc.num_kv_heads, mc.resolved_head_dim)
  return {'k': jax.ShapeDtypeStruct(shape, dt), 'v': jax.ShapeDtypeStruct(shape, dt)}



def cache_shapes(cfg: Config, batch: int, max_len: int, per_layer: bool = False) -> list[dict[str, Any]]:
  """The cache pytree as ShapeDtypeStructs (module docstring: stacked per period when scanned)."""
  mc = cfg.model
  if mc.scan_layers and not per_layer:
    period = max(mc.moe_every, 1)
    return [layer_entry(cfg, batch, max_len, (mc.num_layers // period,)) for _ in range(period)]
  return [layer_entry(cfg, batch, max_len) for _ in range(mc.num_layers)]


def cache_shardings(cfg: Config, mesh, batch: int, max_len: int) -> list[dict[str, Any]]:
  """NamedShardings of the cache pytree on `mesh`, from CACHE_AXES (LATENT_CACHE_AXES for MLA)."""
  axes = LATENT_CACHE_AXES if cfg.model.attention == 'mla' else CACHE_AXES
  return jax.tree.map(lambda s: shd.logical_sharding(mesh, axes, len(s.shape)),
                      cache_shapes(cfg, batch, max_len))


def init_cache(cfg: Config, mesh, batch: int, max_len: int, per_layer: bool = False) -> list[dict[str, Any]]:
  """A zeroed cache: on `mesh`, each array created directly in its sharding; with mesh None, on the
  default device."""
  shapes = cache_shapes(cfg, batch, max_len, per_layer)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
  if mesh is None:
    return zeros()
  if per_layer:
    raise ValueError('init_cache: per_layer is for the unsharded cache (mesh None)')
  return jax.jit(zeros, out_shardings=cache_shardings(cfg, mesh, batch, max_len))()
