"""Decoding from the tiered expert store: the decode step split per layer, so that an MoE layer's experts
are fetched (disk -> host -> device slot) after its router has run and before its experts do.

Per token, for each layer: a dense layer is one jitted program (attention + FFN). An MoE layer is
  1. `moe_pre`: attention, ffn_norm, the router;
  2. the host reads the chosen expert ids (one small device -> host copy) and `Tiers.resolve` puts every
     chosen expert in a device slot (stall) or points it at its int8 copy (fallback);
  3. `experts`: the dropless expert FFN over the slot buffer with expert ids remapped to slots
     (litejax.inference.store.slot_moe), repeated per wave when a step uses more distinct experts than slots;
  4. `finish`: the weighted combine, the shared experts and the residual add;
  5. with lookahead D: `lookahead` applies the routers of the next D MoE layers (each with its own
     ffn_norm scale) to the residual stream `finish` returned; once the next layer's first program is
     dispatched, the host reads the predictions and starts reading the predicted experts that are on
     disk only (and staging them into device slots) on the background thread, overlapping that layer.
Every program has static shapes ([slots, d, h] buffers, [N, K] slot ids), so each compiles once per
(batch, tokens); the same programs serve every layer (layer weights are arguments). The arithmetic is
the resident decode step's (litejax.inference.decode, one device, dropless), so with miss='stall' tokens and
logits are bit-identical to it (tests/test_tiered_decode.py).

One device only: the store runtime does not shard (expert parallelism over a store is future work).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litejax.model.moe import routing
from litejax.config import Config
from litejax.inference.decode import Generation, decode_config, pad_prompts, prefill_config
from litejax.model.layers import DTYPES
from litejax.inference.sampling import Sampling, sample
from litejax.inference.store import lookahead as lookahead_lib
from litejax.inference.store import slot_moe
from litejax.inference.store.levels import Tiers


# ---------------------------------------------------------------------------- per-layer weights

@dataclasses.dataclass
class Layer:
  """One model layer's weights for the split step: (graphdefs, states) of its sub-modules, and for an MoE
  layer its router weights and selection biases. No routed expert weights: those live in the tiers."""
  index: int
  is_moe: bool
  graphdefs: tuple
  states: tuple
  router: dict[str, jax.Array] | None = None
  bias: dict[str, jax.Array] | None = None


def _split(module, period_index):
  gd, st = nnx.split(module)
  if period_index is not None:
    st = jax.tree.map(lambda a: a[period_index], st)
  return gd, st


def model_layers(model) -> list[Layer]:
  """The layers of a model (scanned or not) whose non-expert weights are concrete arrays."""
  mc = model.cfg.model
  out = []
  for i in range(mc.num_layers):
    if mc.scan_layers:
      period = max(mc.moe_every, 1)
      block, p = model.periods.layers[i % period], i // period
    else:
      block, p = model.blocks[i], None
    mods = [block.attn_norm, block.attn, block.ffn_norm]
    take = (lambda t: jax.tree.map(lambda a: a[p], t)) if p is not None else (lambda t: t)  # noqa: E731
    if block.is_moe:
      if hasattr(block.ffn, 'shared'):
        mods.append(block.ffn.shared)
      parts = [_split(m, p) for m in mods]
      bias = block.ffn.router_bias()
      out.append(Layer(i, True, tuple(g for g, _ in parts), tuple(s for _, s in parts),
                       take(block.ffn.router_params()), None if bias is None else take(bias)))
    else:
      parts = [_split(m, p) for m in mods + [block.ffn]]
      out.append(Layer(i, False, tuple(g for g, _ in parts), tuple(s for _, s in parts)))
  return out


def _ahead(moe: list[Layer], depth: int) -> list[Any]:
  """Per MoE layer, the stacked (ffn_norm state, router, bias) of the next `depth` MoE layers (the last
  layers repeat the final one: their extra predictions are never checked)."""
  out = []
  for j in range(len(moe)):
    nxt = [moe[min(j + k, len(moe) - 1)] for k in range(1, depth + 1)]
    out.append(jax.tree.map(lambda *a: jnp.stack(a), *[(l.states[2], l.router, l.bias) for l in nxt])
               if depth else None)
  return out


def _is_routed(path: tuple, cfg: Config) -> bool:
  # params/blocks/<i>/ffn/w_in (MoE layer i) or params/periods/layers/<j>/ffn/w_in (scanned).
  if len(path) < 3 or path[-2] != 'ffn' or path[-1] not in ('w_in', 'w_gate', 'w_out'):
    return False
  mc = cfg.model
  return mc.scan_layers or mc.is_moe_layer(int(path[-3]))


def model_without_experts(cfg: Config, seed: int = 0):
  """The model with every weight but the routed experts initialised as `init_model(cfg, seed)` would
  (one jitted init whose expert outputs are dead code, so XLA never builds them), the routed experts left
  abstract: for a store written by `export-experts --init`, whose model was never trained."""
  from litejax.model.transformer import abstract_model, build_model, init_compiler_options
  model = abstract_model(cfg)

  def build():
    m = build_model(cfg, seed)
    return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(m)) if not _is_routed(path, cfg)}

  values = jax.jit(build, compiler_options=init_compiler_options(jax.default_backend()))()
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if path in values:
      var.set_value(values[path])
  return model


# ---------------------------------------------------------------------------- jitted programs

def _positions(positions_bs, x_bsd):
  # Prefill (positions None): 0..S-1 built inside the program as the resident prefill builds them, so
  # XLA constant-folds the rotary angles the same way in both.
  if positions_bs is not None:
    return positions_bs
  b, s = x_bsd.shape[:2]
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def dense_layer(gds, states, x_bsd, positions_bs, cache):
  positions_bs = _positions(positions_bs, x_bsd)
  attn_norm, attn, ffn_norm, ffn = (nnx.merge(g, s) for g, s in zip(gds, states))
  h, k, v = attn.cached(attn_norm(x_bsd), positions_bs, cache['k'], cache['v'])
  x_bsd = x_bsd + h
  return x_bsd + ffn(ffn_norm(x_bsd)), {'k': k, 'v': v}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(7,))
def moe_pre(gds, moe_cfg, states, router, bias, x_bsd, positions_bs, cache, tier_mask=None):
  """(residual [B,S,d], router input [N,d], expert ids [N,K], weights [N,K], group ids [N,K], cache).
  tier_mask: the TierSet (bool [T]) this layer chooses among (None: every tier)."""
  positions_bs = _positions(positions_bs, x_bsd)
  attn_norm, attn, ffn_norm = (nnx.merge(g, s) for g, s in zip(gds[:3], states[:3]))
  h, k, v = attn.cached(attn_norm(x_bsd), positions_bs, cache['k'], cache['v'])
  x_bsd = x_bsd + h
  b, s, d = x_bsd.shape
  h_nd = ffn_norm(x_bsd).reshape(b * s, d)
  r = routing.route(h_nd, router, moe_cfg, bias, tier_mask=tier_mask)
  return x_bsd, h_nd, r.expert_nk, r.weight_nk, r.group_nk, {'k': k, 'v': v}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def lookahead(norm_gd, moe_cfg, depth, width, ahead, x_bsd, tier_mask=None):
  """[D, N, W·K]: the experts to prefetch for the next D MoE layers: the routers of those layers (each
  with its own ffn_norm scale) applied to the residual stream entering the next layer (after this
  layer's attention and MoE), widened to W·K candidates (litejax.inference.store.lookahead). Measured on
  configs/tiny_1k.yaml (experiments/lookahead_recall.py), this state predicts the next layer's experts
  better than the state before this layer's MoE output is added."""
  b, s, d = x_bsd.shape
  out = []
  for j in range(depth):
    norm_j, router_j, bias_j = jax.tree.map(lambda a: a[j], ahead)
    hj = nnx.merge(norm_gd, norm_j)(x_bsd).reshape(b * s, d)
    out.append(lookahead_lib.candidates(hj, router_j, moe_cfg, bias_j, tier_mask=tier_mask, width=width))
  return jnp.stack(out)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(6,))
def experts(kind, num_experts, slot_w, h_nd, slot_nk, active_nk, acc_nkd, int8_w=None, fallback_f=None):
  return slot_moe.expert_outputs(h_nd, slot_nk, slot_w, kind, num_experts, active_nk, acc_nkd, int8_w,
                                 fallback_f)


@functools.partial(jax.jit, static_argnums=(0,))
def finish(gds, states, x_bsd, h_nd, y_nkd, weight_nk):
  y_nd = slot_moe.combine_outputs(y_nkd, weight_nk)
  if len(gds) > 3:   # shared experts
    y_nd = y_nd + nnx.merge(gds[3], states[3])(h_nd)
  return x_bsd + y_nd.reshape(x_bsd.shape).astype(x_bsd.dtype)


# ---------------------------------------------------------------------------- the runtime

class TieredRuntime:
  """Decoding with routed experts from `tiers` and every other weight from `model` (one device)."""

  def __init__(self, cfg: Config, model, tiers: Tiers, tier_mask: Any = None):
    """tier_mask: optional bool [T], the TierSet every MoE layer routes among (litejax.inference.tiersets)."""
    self.cfg, self.tiers = decode_config(cfg), tiers
    self.tier_mask = None if tier_mask is None else jnp.asarray(tier_mask, bool)
    self.prefill_cfg = prefill_config(cfg)
    if self.prefill_cfg.moe.dispatch != 'dropless':
      raise ValueError('moe.eval_capacity_factor: decoding from a store needs dropless prefill (null)')
    mc = cfg.model
    self.dt = DTYPES[mc.dtype]
    self.layers = model_layers(model)
    self.moe = [l for l in self.layers if l.is_moe]
    if [l.index for l in self.moe] != list(tiers.store.layers):
      raise ValueError(f'the store holds layers {tiers.store.layers}, the model has MoE layers '
                       f'{[l.index for l in self.moe]}')
    self.ahead = dict(zip((l.index for l in self.moe), _ahead(self.moe, tiers.opts.lookahead)))
    self.next_moe = {l.index: [m.index for m in self.moe[j + 1:j + 1 + tiers.opts.lookahead]]
                     for j, l in enumerate(self.moe)}
    self.embed = model.embed[...]
    self.w_out = model.embed[...].T if mc.tie_embeddings else model.unembed[...]
    self.final_norm = nnx.split(model.final_norm)
    self.kind = cfg.moe.expert_kind
    self.num_experts = cfg.moe.experts_total
    self.io_s = 0.0

  def _head(self, x_bsd):
    return _head(self.final_norm[0], self.final_norm[1], x_bsd, self.w_out)

  def forward(self, tokens_bs: np.ndarray, positions_bs: np.ndarray, cache: list) -> tuple[jax.Array, list]:
    """Logits [B, S, V] f32 of S new tokens per row at `positions_bs` (None: 0..S-1, the prefill),
    reading and writing `cache` (a list per layer)."""
    x = _embed(self.embed, jnp.asarray(tokens_bs), self.dt)
    pos = None if positions_bs is None else jnp.asarray(positions_bs, jnp.int32)
    moe_cfg = self.cfg.moe
    pending = None    # the last lookahead's (predictions, target layers), read after the next dispatch
    for layer in self.layers:
      c = cache[layer.index]
      if not layer.is_moe:
        x, cache[layer.index] = dense_layer(layer.graphdefs[:4], layer.states, x, pos, c)
        pending = self._prefetch(pending)
        continue
      depth = self.tiers.opts.lookahead
      x, h_nd, e_nk, w_nk, g_nk, cache[layer.index] = moe_pre(
          layer.graphdefs[:3] + layer.graphdefs[3:], moe_cfg, layer.states, layer.router, layer.bias, x, pos, c,
          self.tier_mask)
      pending = self._prefetch(pending)     # the device runs this layer's moe_pre meanwhile
      e_nk_host, g_host = jax.device_get((e_nk, g_nk))   # the round trip
      y = self._experts(layer.index, h_nd, np.asarray(e_nk_host), np.asarray(g_host))
      x = finish(layer.graphdefs, layer.states, x, h_nd, y, w_nk)
      targets = self.next_moe[layer.index]
      if depth and targets:   # prefetch from the stream entering the next layer (module docstring)
        pending = (lookahead(layer.graphdefs[2], moe_cfg, depth, self.tiers.opts.lookahead_width,
                             self.ahead[layer.index], x, self.tier_mask), targets)
    self._prefetch(pending)
    return self._head(x), cache

  def _prefetch(self, pending) -> None:
    """Starts the prefetch of a lookahead's predictions (None: nothing pending). Called after the next
    layer's first program is dispatched, so the host waits for the predictions while the device runs it
    rather than leaving the device idle. Candidates go best first across the batch (rank-major), the
    order staging takes them in."""
    if pending is not None:
      ahead_host = jax.device_get(pending[0])
      for d, target in enumerate(pending[1]):
        self.tiers.prefetch(target, ahead_host[d].T.reshape(-1), d + 1)
    return None

  def _experts(self, layer: int, h_nd, e_nk: np.ndarray, g_nk: np.ndarray) -> jax.Array:
    """[N, K, d] expert outputs, in as many waves as the slots need."""
    tiers = self.tiers
    unique = list(dict.fromkeys(int(e) for e in e_nk.reshape(-1)))
    acc = jnp.zeros(e_nk.shape + (h_nd.shape[-1],), h_nd.dtype)
    groups = list(dict.fromkeys(int(g) for g in g_nk.reshape(-1))) if tiers.opts.policy == 'group' else ()
    for start in range(0, len(unique), tiers.num_slots):
      wave = unique[start:start + tiers.num_slots]
      slot = tiers.resolve(layer, wave, groups)
      lut = np.zeros(self.num_experts, np.int32)
      active = np.zeros(self.num_experts, bool)
      fb = tiers.fallback_ids
      for e in wave:
        s = slot[e]
        lut[e] = s if s >= 0 else tiers.num_slots + (-1 - s)
        active[e] = True
      slot_nk, active_nk = lut[e_nk], active[e_nk]
      if tiers.opts.miss == 'fallback':
        width = e_nk.size   # static: at most one fallback per assignment
        fb_f = np.zeros(width, np.int32)
        fb_f[:len(fb)] = fb
        acc = experts(self.kind, self.num_experts, tiers.slots[layer].buffers, h_nd, slot_nk, active_nk, acc,
                      tiers.int8[layer], fb_f)
      else:
        acc = experts(self.kind, self.num_experts, tiers.slots[layer].buffers, h_nd, slot_nk, active_nk, acc)
    return acc

  def init_cache(self, batch: int, max_len: int) -> list:
    mc = self.cfg.model
    shape = (batch, max_len, mc.num_kv_heads, mc.resolved_head_dim)
    return [{'k': jnp.zeros(shape, self.dt), 'v': jnp.zeros(shape, self.dt)} for _ in range(mc.num_layers)]

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, keep_logits: bool = False) -> tuple[Generation, list[np.ndarray]]:
    """As litejax.inference.decode.generate (batch = len(prompts)); returns (Generation, logits per decode step
    [B, V] when keep_logits: the prefill's last-position logits first)."""
    sampling.validate()
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens: must be >= 1, got {max_new_tokens}')
    batch = len(prompts)
    tokens, lengths = pad_prompts(prompts, batch)
    cache = self.init_cache(batch, tokens.shape[1] + max_new_tokens)
    key, samp = jax.random.key(seed), sampling.as_arrays()
    out: list[list[int]] = [[] for _ in range(batch)]
    kept, step_s = [], []
    t0 = time.perf_counter()
    logits_bpv, cache = self.forward(tokens, None, cache)
    last_bv = jnp.take_along_axis(logits_bpv, jnp.asarray(lengths - 1)[:, None, None], axis=1)[:, 0]
    next_b = _sample(last_bv, key, samp)
    host = np.asarray(next_b)
    ttft = time.perf_counter() - t0
    self.tiers.end_step()
    if keep_logits:
      kept.append(np.asarray(last_bv))
    stall0 = self.tiers.counters.stall_s
    self.step_stall_s = []
    for j in range(max_new_tokens):
      for i in range(batch):
        out[i].append(int(host[i]))
      if j == max_new_tokens - 1:
        break
      t0, s0 = time.perf_counter(), self.tiers.counters.stall_s
      logits_b1v, cache = self.forward(host[:, None], (lengths + j)[:, None], cache)
      next_b = _sample(logits_b1v[:, 0], jax.random.fold_in(key, j + 1), samp)
      host = np.asarray(next_b)
      step_s.append(time.perf_counter() - t0)
      self.step_stall_s.append(self.tiers.counters.stall_s - s0)
      self.tiers.end_step()
      if keep_logits:
        kept.append(np.asarray(logits_b1v[:, 0]))
    self.decode_stall_s = self.tiers.counters.stall_s - stall0
    return Generation(out, ttft, step_s, False, moe_pre._cache_size()), kept


@functools.partial(jax.jit, static_argnums=(2,))
def _embed(embed_vd, tokens_bs, dt):
  return embed_vd[tokens_bs].astype(dt)


@functools.partial(jax.jit, static_argnums=(0,))
def _head(gd, state, x_bsd, w_out):
  x = nnx.merge(gd, state)(x_bsd)
  return jnp.einsum('bsd,dv->bsv', x, w_out.astype(x.dtype)).astype(jnp.float32)


_sample = jax.jit(sample)
