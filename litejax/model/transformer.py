"""Decoder-only language model (NNX): embed -> L × (attention, dense FFN or MoE) -> norm -> logits.

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
from litejax.model.moe.block import MoEBlock, MoEStats


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x)) where ffn is dense or MoE."""

  def __init__(self, cfg: Config, is_moe: bool, rngs: nnx.Rngs):
    mc = cfg.model
    pd = DTYPES[mc.param_dtype]
    self.is_moe = is_moe
    self.attn_norm = RMSNorm(mc.d_model, mc.norm_eps)
    self.attn = Attention(mc, rngs)
    self.ffn_norm = RMSNorm(mc.d_model, mc.norm_eps)
    self.ffn = MoEBlock(cfg, rngs) if is_moe else FFN(mc.d_model, mc.resolved_d_ff, mc.ffn_kind, rngs, pd)

  def __call__(self, x_bsd, positions_bs, tier_mask=None):
    x_bsd = x_bsd + self.attn(self.attn_norm(x_bsd), positions_bs)
    h = self.ffn_norm(x_bsd)
    if self.is_moe:
      y, aux = self.ffn(h, tier_mask)
    else:
      with jax.named_scope('dense_ffn'):   # scope names the FLOPs for litejax.analysis.bound
        y, aux = self.ffn(h), None
    return x_bsd + y, aux


class Period(nnx.Module):
  """`moe_every` consecutive layers, the last one MoE (or one dense layer if moe_every == 0)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    n = max(cfg.model.moe_every, 1)
    self.layers = nnx.List([Block(cfg, cfg.model.moe_every > 0 and i == n - 1, rngs) for i in range(n)])

  def __call__(self, x_bsd, positions_bs, tier_mask=None):
    aux = None
    for layer in self.layers:
      x_bsd, a = layer(x_bsd, positions_bs, tier_mask)
      aux = a if a is not None else aux
    return x_bsd, aux


class Transformer(nnx.Module):
  """The litejax LM. __call__(tokens [B, S]) -> (logits [B, S, V] f32, aux)."""

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

  def __call__(self, tokens_bs: jax.Array, tier_mask: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
    """logits [B, S, V] f32 and the MoE layers' stats stacked [L_moe, ...] (in layer order).
    tier_mask: optional bool [T], a TierSet: every MoE layer routes among those tiers only."""
    mc = self.cfg.model
    dt = DTYPES[mc.dtype]
    b, s = tokens_bs.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = self.embed[...][tokens_bs].astype(dt)
    if mc.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      def step(x_c, period):
        x_c, aux = period(x_c, positions, tier_mask)
        return x_c, (aux if aux is not None else ())

      x, stats = step(x, self.periods)
    else:
      per_layer = []
      for block in self.blocks:
        x, aux = block(x, positions, tier_mask)
        if aux is not None:
          per_layer.append(aux)
      stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer else ()
    if not isinstance(stats, MoEStats):   # no MoE layer
      stats = MoEStats.empty(self.cfg.moe)
    x = self.final_norm(x)
    w_out = self.embed[...].T if mc.tie_embeddings else self.unembed[...]
    with jax.named_scope('unembed'):
      logits = jnp.einsum('bsd,dv->bsv', x, w_out.astype(dt)).astype(jnp.float32)
    return logits, stats


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
