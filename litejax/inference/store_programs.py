"""The expert store runtime's per-layer programs (litejax.inference.store_decode) and the weights they take.

Each program is a piece of the model's own forward (litejax.model.transformer): `embed_tokens`, a Block's
`attention` and `feed_forward` halves, or an MoE Block's FFN half split around the experts (`route`,
then the store's experts over device slots, then `combine`), and `output_logits`. A pre-gated model
(moe.pregate = D) splits `route` in two: `moe_attend` returns a layer's router input, and `pregate` routes
it with the router of the MoE layer D ahead, whose experts the store then fetches. A layer's weights are
its Block's graphdef and state with the routed expert tables left empty (None): those live in the store's
levels (litejax.inference.store.levels), and no program reads them.

`build_programs` jits a fresh set of programs: each set keeps its own compile cache (a `jax.jit` of one
function object shares its cache with every other jit of it), so a runtime's compile counts are its own.
Every program is called through `Hooks`, the runtime's one seam for observing its device work.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from litejax.inference.sampling import sample
from litejax.inference.store import lookahead as lookahead_lib
from litejax.inference.store import slot_moe
from litejax.model.moe import routing
from litejax.model.moe.block import EXPERT_TABLES
from litejax.model.transformer import causal_positions, embed_tokens, output_logits


# ---------------------------------------------------------------------------- per-layer weights

@dataclasses.dataclass
class Gate:
  """What an MoE layer's router reads, for lookahead and pre-gated routing: its ffn_norm (graphdef, state),
  router weights and selection biases (None without sigmoid scoring)."""
  norm_graphdef: Any
  norm_state: Any
  router: dict[str, jax.Array]
  bias: dict[str, jax.Array] | None


@dataclasses.dataclass
class Layer:
  """One model layer for the per-layer programs: its Block's graphdef and state, the routed expert tables
  empty (None), and for an MoE layer its Gate."""
  index: int
  is_moe: bool
  graphdef: Any
  state: Any
  gate: Gate | None = None


def _routed_table(path: tuple, _) -> bool:
  return len(path) >= 2 and path[-2] == 'ffn' and path[-1] in EXPERT_TABLES


def _layer(index: int, block, period_index: int | None) -> Layer:
  take = (lambda t: t) if period_index is None else (lambda t: jax.tree.map(lambda a: a[period_index], t))  # noqa: E731
  if block.is_moe:
    graphdef, routed, rest = nnx.split(block, _routed_table, ...)
    empty = jax.tree.map(lambda _: None, routed)
    state = nnx.merge_state(empty, take(rest))
    norm_graphdef, norm_state = nnx.split(block.ffn_norm)
    bias = block.ffn.router_bias()
    gate = Gate(norm_graphdef, take(norm_state), take(block.ffn.router_params()), None if bias is None else take(bias))
    return Layer(index, True, graphdef, state, gate)
  graphdef, state = nnx.split(block)
  return Layer(index, False, graphdef, take(state))


def model_layers(model) -> list[Layer]:
  """The layers of a model (scanned or not) whose non-expert weights are concrete arrays."""
  mc = model.cfg.model
  if not mc.scan_layers:
    return [_layer(i, block, None) for i, block in enumerate(model.blocks)]
  period = max(mc.moe_every, 1)
  return [_layer(i, model.periods.layers[i % period], i // period) for i in range(mc.num_layers)]


def stacked_gates(moe: list[Layer], depth: int) -> list[Any]:
  """Per MoE layer, the stacked (ffn_norm state, router, bias) of the next `depth` MoE layers (the last
  layers repeat the final one: their extra predictions are never checked); None when depth is 0."""
  out = []
  for j in range(len(moe)):
    nxt = [moe[min(j + k, len(moe) - 1)].gate for k in range(1, depth + 1)]
    out.append(jax.tree.map(lambda *a: jnp.stack(a), *[(g.norm_state, g.router, g.bias) for g in nxt])
               if depth else None)
  return out


# ---------------------------------------------------------------------------- the programs

def _positions(positions_bs, x_bsd):
  # Prefill (positions None): 0..S-1 built inside the program, as the resident prefill builds them.
  return causal_positions(*x_bsd.shape[:2]) if positions_bs is None else positions_bs


def embed(embed_vd, tokens_bs, dtype):
  return embed_tokens(embed_vd, tokens_bs, dtype)


def dense_layer(graphdef, state, x_bsd, positions_bs, kv):
  """A dense layer: both halves of its Block. Returns (x, kv)."""
  block = nnx.merge(graphdef, state)
  x_bsd, kv = block.attention(x_bsd, _positions(positions_bs, x_bsd), kv)
  return block.feed_forward(x_bsd)[0], kv


def moe_pre(graphdef, state, x_bsd, positions_bs, kv, tier_mask=None):
  """An MoE layer up to its experts: the attention half and the router. Returns (residual [B,S,d], router
  input [N,d], expert ids [N,K], weights [N,K], group ids [N,K], kv). tier_mask: the TierSet (bool [T])
  this layer chooses among (None: every tier)."""
  block = nnx.merge(graphdef, state)
  x_bsd, kv = block.attention(x_bsd, _positions(positions_bs, x_bsd), kv)
  h_nd, r = block.route(x_bsd, tier_mask)
  return x_bsd, h_nd, r.expert_nk, r.weight_nk, r.group_nk, kv


def moe_attend(graphdef, state, x_bsd, positions_bs, kv):
  """A pre-gated MoE layer up to its experts, whose routing was made D MoE layers earlier: the attention
  half and the layer's router input (Block.router_input). Returns (residual [B,S,d], router input [N,d], kv)."""
  block = nnx.merge(graphdef, state)
  x_bsd, kv = block.attention(x_bsd, _positions(positions_bs, x_bsd), kv)
  return x_bsd, block.router_input(x_bsd), kv


def pregate(moe_cfg, router, bias, h_nd, tier_mask=None):
  """Pre-gated routing: the router of the MoE layer D ahead (its Gate's weights and biases) applied to this
  layer's router input h [N, d], as that layer's Block.route does (litejax.model.moe.routing.route).
  Returns (expert ids [N,K], weights [N,K], group ids [N,K]) for that layer."""
  r = routing.route(h_nd, router, moe_cfg, bias, tier_mask=tier_mask)
  return r.expert_nk, r.weight_nk, r.group_nk


def lookahead(norm_graphdef, moe_cfg, depth, width, ahead, x_bsd, tier_mask=None):
  """[D, N, W·K]: the experts to prefetch for the next D MoE layers: the routers of those layers (each
  with its own ffn_norm scale) applied to the residual stream entering the next layer (after this
  layer's attention and MoE), widened to W·K candidates (litejax.inference.store.lookahead). Measured on
  configs/tiny_1k.yaml (experiments/lookahead_recall.py), this state predicts the next layer's experts
  better than the state before this layer's MoE output is added."""
  b, s, d = x_bsd.shape
  out = []
  for j in range(depth):
    norm_j, router_j, bias_j = jax.tree.map(lambda a: a[j], ahead)
    hj = nnx.merge(norm_graphdef, norm_j)(x_bsd).reshape(b * s, d)
    out.append(lookahead_lib.candidates(hj, router_j, moe_cfg, bias_j, tier_mask=tier_mask, width=width))
  return jnp.stack(out)


def experts(kind, num_experts, slot_w, h_nd, slot_nk, active_nk, acc_nkd, int8_w=None, fallback_f=None):
  """[N, K, d]: one wave of expert outputs over the slot buffer (litejax.inference.store.slot_moe)."""
  return slot_moe.expert_outputs(h_nd, slot_nk, slot_w, kind, num_experts, active_nk, acc_nkd, int8_w,
                                 fallback_f)


def finish(graphdef, state, x_bsd, h_nd, y_nkd, weight_nk):
  """An MoE layer after its experts: the weighted combine, the shared experts and the residual (Block.combine)."""
  return nnx.merge(graphdef, state).combine(x_bsd, h_nd, slot_moe.combine_outputs(y_nkd, weight_nk))


def head(norm_graphdef, norm_state, x_bsd, w_out_dv):
  return output_logits(nnx.merge(norm_graphdef, norm_state), x_bsd, w_out_dv)


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program of a set, with the positions of its static arguments."""
  name: str
  fn: Callable
  static_argnums: tuple[int, ...] = ()


# name: (function, static argnums, donated argnums). The names are the ones latency recordings report.
PROGRAMS: dict[str, tuple[Callable, tuple[int, ...], tuple[int, ...]]] = {
    '_embed': (embed, (2,), ()),
    'dense_layer': (dense_layer, (0,), (4,)),
    'moe_pre': (moe_pre, (0,), (4,)),
    'moe_attend': (moe_attend, (0,), (4,)),
    'pregate': (pregate, (0,), ()),
    'experts': (experts, (0, 1), (6,)),
    'finish': (finish, (0,), ()),
    'lookahead': (lookahead, (0, 1, 2, 3), ()),
    '_head': (head, (0,), ()),
    '_sample': (sample, (), ()),
}


def _own(fn: Callable) -> Callable:
  """A new function object calling `fn`: jitted, it has a compile cache of its own."""
  @functools.wraps(fn)
  def program(*args, **kwargs):
    return fn(*args, **kwargs)
  return program


def build_programs() -> dict[str, Program]:
  """A fresh set of the jitted programs, with compile caches of its own (module docstring)."""
  return {name: Program(name, jax.jit(_own(fn), static_argnums=static, donate_argnums=donate), static)
          for name, (fn, static, donate) in PROGRAMS.items()}


class Hooks:
  """What a store runtime calls for its device work: every program call and every wait for a device
  result. These defaults only run them; litejax.inference.step_latency's recorder times them."""

  def call(self, program: Program, *args, **kwargs):
    return program.fn(*args, **kwargs)

  def device_get(self, tree):
    return jax.device_get(tree)
