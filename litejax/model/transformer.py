"""Decoder-only language model (NNX): embed -> L × (attention, dense FFN or MoE) -> norm -> logits, one
forward for training, prefill and cached decoding (`Transformer.__call__(..., cache=)`).

Layer i (1-based) is MoE when i % moe_every == 0. With `scan_layers`, each run of `moe_every`
layers (dense..., MoE) is one scanned "period" with stacked parameters (leading axis 'layers').
Expert dispatch follows the ambient mesh: run the model under `jax.set_mesh(mesh)` for expert
parallelism (litejax.model.moe.expert_parallel), with no mesh for single-device dispatch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from litejax.config import Config, ConfigError
from litejax.model.layers import DTYPES, FFN, Attention, RMSNorm, param
from litejax.model.mla import MLAttention
from litejax.model.moe.block import MoEBlock, MoEStats
from litejax.model.moe.routing import Routing


def causal_positions(batch: int, seq: int) -> jax.Array:
  """int32 [B, S]: positions 0..S-1 of every row (a forward over whole sequences, and prefill). Built
  inside the program that uses them, so XLA folds the rotary angles the same way wherever they are."""
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def embed_tokens(embed_vd: jax.Array, tokens_bs: jax.Array, dtype) -> jax.Array:
  """[B, S, d] input embeddings in the compute dtype."""
  return embed_vd[tokens_bs].astype(dtype)


def output_logits(final_norm: RMSNorm, x_bsd: jax.Array, w_out_dv: jax.Array) -> jax.Array:
  """Logits [B, S, V] f32 of the residual stream: the final norm, then the unembedding."""
  x_bsd = final_norm(x_bsd)
  with jax.named_scope('unembed'):   # scope names the FLOPs for litejax.analysis.bound
    return jnp.einsum('bsd,dv->bsv', x_bsd, w_out_dv.astype(x_bsd.dtype)).astype(jnp.float32)


class Block(nnx.Module):
  """Pre-norm residual block in two halves: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)) where ffn is
  dense or MoE. An MoE block's FFN half is `route` -> the routed experts -> `combine`; the expert store's
  runtime (litejax.inference.store_programs) calls those pieces with its own experts in between.

  Where variants land: an attention variant in its class (GQA: layers.Attention; DeepSeek's latent
  attention: litejax.model.mla, `model.attention: mla`) and the cache entry it keeps
  (litejax.model.kv_cache.layer_entry); a router variant in `route`. Pre-gated routing (moe.pregate
  = D): `route` reads the router input of the MoE layer D earlier, which the Transformer carries down
  (a queue of D router inputs [N, d]; under a scan over layers part of the scan's carry).
  """

  def __init__(self, cfg: Config, is_moe: bool, rngs: nnx.Rngs):
    mc = cfg.model
    pd = DTYPES[mc.param_dtype]
    self.is_moe = is_moe
    self.attn_norm = RMSNorm(mc.d_model, mc.norm_eps)
    self.attn = MLAttention(mc, rngs) if mc.attention == 'mla' else Attention(mc, rngs)
    self.ffn_norm = RMSNorm(mc.d_model, mc.norm_eps)
    self.ffn = MoEBlock(cfg, rngs) if is_moe else FFN(mc.d_model, mc.resolved_d_ff, mc.ffn_kind, rngs, pd)

  def attention(self, x_bsd: jax.Array, positions_bs: jax.Array, kv: dict[str, jax.Array] | None = None):
    """The attention half with its residual: (x + attn(attn_norm(x)), kv). With `kv`, this layer's cache
    entry (litejax.model.kv_cache: {'k', 'v'}, or MLA's {'latent', 'k_rope'}: the attention's CACHE_KEYS),
    attention writes this call's entries at `positions_bs` and reads the cache; the entry comes back
    updated (None without a cache)."""
    h_bsd = self.attn_norm(x_bsd)
    if kv is None:
      return x_bsd + self.attn(h_bsd, positions_bs), None
    keys = self.attn.CACHE_KEYS
    out, *entry = self.attn.cached(h_bsd, positions_bs, *(kv[k] for k in keys))
    return x_bsd + out, dict(zip(keys, entry))

  def router_input(self, x_bsd: jax.Array) -> jax.Array:
    """MoE block: ffn_norm(x) as [N, d] tokens, what its experts (and, unless pre-gated, its router) read."""
    b, s, d = x_bsd.shape
    return self.ffn_norm(x_bsd).reshape(b * s, d)

  def route(self, x_bsd: jax.Array, tier_mask: jax.Array | None = None, gate_in_nd: jax.Array | None = None,
            gate_own: jax.Array | None = None) -> tuple[jax.Array, Routing]:
    """MoE block: (its router input h = ffn_norm(x) [N, d], which its experts read, and the router's choice).
    A pre-gated layer (moe.pregate = D) routes `gate_in_nd` [N, d] in place of h: the router input of the MoE
    layer D earlier, the same tokens. gate_own: under a scan over layers, a bool scalar that is true for the first D MoE
    layers, which route their own input (a select, not a branch: the scan runs one body)."""
    h_nd = self.router_input(x_bsd)
    router_in = h_nd
    if gate_in_nd is not None:
      router_in = gate_in_nd if gate_own is None else jnp.where(gate_own, h_nd, gate_in_nd)
    return h_nd, self.ffn.route(router_in, tier_mask)

  def combine(self, x_bsd: jax.Array, h_nd: jax.Array, y_nd: jax.Array) -> jax.Array:
    """MoE block: the FFN half's residual, x + (y + shared experts(h)), from the routed experts' combined
    output y [N, d] on the router input h [N, d]."""
    return x_bsd + self.ffn.add_shared(h_nd, y_nd).reshape(x_bsd.shape).astype(x_bsd.dtype)

  def feed_forward(self, x_bsd: jax.Array, tier_mask: jax.Array | None = None, gate_in_nd: jax.Array | None = None,
                   gate_own: jax.Array | None = None) -> tuple[jax.Array, MoEStats | None, jax.Array | None]:
    """The FFN half with its residual: (x + ffn(ffn_norm(x)), MoEStats of an MoE block, else None, and an MoE
    block's own router input ffn_norm(x) [N, d], else None). gate_in_nd, gate_own: as `route`."""
    if not self.is_moe:
      h_bsd = self.ffn_norm(x_bsd)
      with jax.named_scope('dense_ffn'):   # scope names the FLOPs for litejax.analysis.bound
        y_bsd = self.ffn(h_bsd)
      return x_bsd + y_bsd, None, None
    h_nd, r = self.route(x_bsd, tier_mask, gate_in_nd, gate_own)
    y_nd, stats = self.ffn.routed_experts(h_nd, r)
    return self.combine(x_bsd, h_nd, y_nd), stats, h_nd

  def __call__(self, x_bsd, positions_bs, tier_mask=None, kv=None, gate_in_nd=None, gate_own=None):
    """(x after both halves, MoEStats or None, the updated cache entry or None, an MoE block's router input
    or None)."""
    x_bsd, kv = self.attention(x_bsd, positions_bs, kv)
    x_bsd, aux, h_nd = self.feed_forward(x_bsd, tier_mask, gate_in_nd, gate_own)
    return x_bsd, aux, kv, h_nd


def _push_gate(queue: tuple, h_nd: jax.Array, depth: int) -> tuple:
  """The pre-gating queue after an MoE layer: the router inputs of the last `depth` MoE layers, oldest first."""
  return (queue + (h_nd,))[-depth:] if depth else ()


class Period(nnx.Module):
  """`moe_every` consecutive layers, the last one MoE (or one dense layer if moe_every == 0)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    n = max(cfg.model.moe_every, 1)
    self.layers = nnx.List([Block(cfg, cfg.model.moe_every > 0 and i == n - 1, rngs) for i in range(n)])

  def __call__(self, x_bsd, positions_bs, tier_mask=None, cache=None, gate=None):
    """(x, the MoE layer's stats or None, the period's cache entries or None, gate). gate: pre-gated routing's
    scan carry (queue, MoE layers so far) or None (moe.pregate 0): the queue holds the router inputs
    [N, d] of the last D MoE layers, oldest first; the period's MoE layer routes the oldest unless it is
    among the first D (Block.route)."""
    aux, new = None, []
    for i, layer in enumerate(self.layers):
      gate_in = own = None
      if gate is not None and layer.is_moe:
        gate_in, own = gate[0][0], gate[1] < len(gate[0])
      x_bsd, a, kv, h_nd = layer(x_bsd, positions_bs, tier_mask, None if cache is None else cache[i], gate_in, own)
      if gate_in is not None:
        gate = (_push_gate(gate[0], h_nd, len(gate[0])), gate[1] + 1)
      aux = a if a is not None else aux
      new.append(kv)
    return x_bsd, aux, (None if cache is None else new), gate


class Transformer(nnx.Module):
  """The litejax LM, for training, prefill and cached decoding alike (`__call__`)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    mc = cfg.model
    pd = DTYPES[mc.param_dtype]
    self.cfg = cfg
    self.embed = param(rngs, (mc.vocab_size, mc.d_model), ('vocab', 'embed'), mc.d_model, pd)
    if mc.scan_layers:
      period = max(mc.moe_every, 1)
      if mc.num_layers % period:
        raise ConfigError(f'model.scan_layers: model.num_layers ({mc.num_layers}) must be a multiple of '
                          f'model.moe_every ({mc.moe_every}) to scan identical periods')

      @nnx.split_rngs(splits=mc.num_layers // period)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r):
        return Period(cfg, r)

      self.periods = make(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, mc.is_moe_layer(i), rngs) for i in range(mc.num_layers)])
    self.final_norm = RMSNorm(mc.d_model, mc.norm_eps)
    if not mc.tie_embeddings:
      self.unembed = param(rngs, (mc.d_model, mc.vocab_size), ('embed', 'vocab'), mc.d_model, pd)

  def moe_blocks(self) -> list[MoEBlock]:
    """The MoE blocks (unscanned models only; a scanned model holds one stacked block)."""
    if hasattr(self, 'blocks'):
      return [b.ffn for b in self.blocks if b.is_moe]
    return [layer.ffn for layer in self.periods.layers if layer.is_moe]

  def output_weights(self) -> jax.Array:
    """The unembedding [d, V] (the embedding's transpose when tied)."""
    return self.embed[...].T if self.cfg.model.tie_embeddings else self.unembed[...]

  def __call__(self, tokens_bs: jax.Array, tier_mask: jax.Array | None = None, *,
               positions_bs: jax.Array | None = None, cache: list | None = None):
    """embed -> blocks -> final norm -> unembed over S tokens per row.

    Without `cache` (training, evaluation): (logits [B, S, V] f32, MoEStats stacked [L_moe, ...] in layer
    order), every row at positions 0..S-1. With `cache` (litejax.model.kv_cache layout): the tokens sit at
    `positions_bs` (default 0..S-1: prefill), attention reads and writes the cache, and the result is
    (logits, stats, updated cache). tier_mask: optional bool [T], a TierSet: every MoE layer routes among
    those tiers only."""
    mc = self.cfg.model
    b, s = tokens_bs.shape
    positions = causal_positions(b, s) if positions_bs is None else positions_bs
    x = embed_tokens(self.embed[...], tokens_bs, DTYPES[mc.dtype])
    depth = self.cfg.moe.pregate if mc.num_moe_layers else 0
    if mc.scan_layers:
      # Pre-gating's queue starts as D copies of the embeddings reshaped to [N, d]: placeholders with the
      # tokens' sharding, never routed (the first D MoE layers route their own input).
      gate = ((x.reshape(b * s, -1),) * depth, jnp.zeros((), jnp.int32)) if depth else None

      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0))
      def step(carry, period, cache_p):
        x_c, gate_c = carry
        x_c, aux, cache_p, gate_c = period(x_c, positions, tier_mask, cache_p, gate_c)
        return (x_c, gate_c), (aux if aux is not None else ()), cache_p

      (x, _), stats, new_cache = step((x, gate), self.periods, cache)
    else:
      per_layer, new_cache, queue = [], [], ()
      for i, block in enumerate(self.blocks):
        gate_in = queue[0] if depth and len(queue) == depth else None
        x, aux, kv, h_nd = block(x, positions, tier_mask, None if cache is None else cache[i], gate_in)
        new_cache.append(kv)
        if aux is not None:
          per_layer.append(aux)
          queue = _push_gate(queue, h_nd, depth)
      stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer else ()
    if not isinstance(stats, MoEStats):   # no MoE layer
      stats = MoEStats.empty(self.cfg.moe)
    logits = output_logits(self.final_norm, x, self.output_weights())
    return (logits, stats) if cache is None else (logits, stats, new_cache)


def layer_mean(x_l: jax.Array) -> jax.Array:
  """Mean over the stacked MoE-layer axis of a `MoEStats` field; zeros for a model without MoE layers."""
  return jnp.mean(x_l, axis=0) if x_l.shape[0] else jnp.zeros(x_l.shape[1:], x_l.dtype)


def build_model(cfg: Config, seed: int = 0) -> Transformer:
  """The model with its parameters drawn from `seed`: litejax's one initialisation. `init_model(cfg, s)`,
  the step-0 state of a run with `train.seed: s` (litejax.train.step) and a store's non-expert weights
  (litejax.inference.store_decode.model_without_experts) are all this function, traced inside a jit.

  The key is JAX's default threefry: the same values on every mesh and backend, and a sharded init
  generates only each device's part of a parameter.
  """
  return Transformer(cfg, nnx.Rngs(params=seed))


def init_compiler_options(platform: str) -> dict[str, int]:
  """XLA options for a program that runs once (an init): on CPU, LLVM -O1 compiles threefry's hash several
  times faster than the default -O3, for the same bits (tests/test_train.py checks init_model against the
  train state's own program)."""
  return {'xla_backend_optimization_level': 1} if platform == 'cpu' else {}


def init_model(cfg: Config, seed: int = 0) -> Transformer:
  """Builds the model with materialised parameters: `build_model` as one jitted program (eager init
  compiles one kernel per parameter shape), compiled with `init_compiler_options`."""
  graphdef = nnx.split(abstract_model(cfg))[0]
  state = jax.jit(lambda: nnx.state(build_model(cfg, seed)),
                  compiler_options=init_compiler_options(jax.default_backend()))()
  return nnx.merge(graphdef, state)


def abstract_model(cfg: Config) -> Transformer:
  """The model with ShapeDtypeStruct leaves: nothing is allocated (works for 1e15 parameters)."""
  return nnx.eval_shape(lambda: build_model(cfg))
