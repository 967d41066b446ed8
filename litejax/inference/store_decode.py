"""Decoding from the expert store: the decode step split per layer, so that an MoE layer's experts
are fetched (disk -> host -> device slot) after its router has run and before its experts do.

Per token, for each layer (the programs are litejax.inference.store_programs', pieces of the model's own
forward): a dense layer is one jitted program (both halves of its Block). An MoE layer is
  1. `moe_pre`: the attention half, ffn_norm, the router;
  2. the host reads the chosen expert ids (one small device -> host copy) and `ExpertLevels.resolve` puts every
     chosen expert in a device slot (stall) or points it at its int8 copy (fallback);
  3. `experts`: the dropless expert FFN over the slot buffer with expert ids remapped to slots
     (litejax.inference.store.slot_moe), repeated per wave when a step uses more distinct experts than slots;
  4. `finish`: the weighted combine, the shared experts and the residual add (Block.combine);
  5. with lookahead D: `lookahead` applies the routers of the next D MoE layers (each with its own
     ffn_norm scale) to the residual stream `finish` returned; once the next layer's first program is
     dispatched, the host reads the predictions and starts reading the predicted experts that are on
     disk only (and staging them into device slots) on the background thread, overlapping that layer.
A pre-gated model (moe.pregate = D) knows layer l's experts when MoE layer l - D runs: there, `pregate` routes
that layer's router input with layer l's router, and the host reads the ids at once (the earlier their
reads start, the more of them arrive before their layer) and hands them to `ExpertLevels.prefetch(exact=True)`:
disk reads and slot staging on the background thread, nearest layer first, nothing guessed; then it looks
up this layer's slots and dispatches its experts. Layer l then
runs `moe_attend` (attention and router input, no routing) and resolves its slots with the ids it already
holds, so no host round trip stands between its attention and its experts; only the first D MoE layers
of a token route their own input with `moe_pre` and wait for it. No lookahead routers run (--lookahead 0).
Every program has static shapes ([slots, d, h] buffers, [N, K] slot ids), so each compiles once per
(batch, tokens); the same programs serve every layer (layer weights are arguments). The arithmetic is
the resident decode step's (litejax.inference.decode, one device, dropless), so with miss='stall' tokens and
logits are bit-identical to it (tests/test_tiered_decode.py).

A runtime owns its programs (`store_programs.build_programs`, or a set passed in) and reports their
compile counts; every program call and every wait for a device result goes through `Hooks`, which
`generate` takes as an argument (litejax.inference.step_latency records a step through them).

One device only: the store runtime does not shard (expert parallelism over a store is future work).
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litejax import jaxcompat
from litejax.config import Config
from litejax.inference.decode import Generation, Request, decode_config, prefill_config, run_generation
from litejax.inference.sampling import Sampling
from litejax.inference.store.levels import ExpertLevels
from litejax.inference.store_programs import Hooks, Program, build_programs, model_layers, stacked_gates
from litejax.model import kv_cache
from litejax.model.layers import DTYPES
from litejax.model.moe.block import EXPERT_TABLES
from litejax.model.transformer import abstract_model, build_model, init_compiler_options

DEFAULT_HOOKS = Hooks()


# ---------------------------------------------------------------------------- a model for an --init store

def _is_routed(path: tuple, cfg: Config) -> bool:
  # params/blocks/<i>/ffn/w_in (MoE layer i) or params/periods/layers/<j>/ffn/w_in (scanned).
  if len(path) < 3 or path[-2] != 'ffn' or path[-1] not in EXPERT_TABLES:
    return False
  mc = cfg.model
  return mc.scan_layers or mc.is_moe_layer(int(path[-3]))


def model_without_experts(cfg: Config, seed: int = 0):
  """The model with every weight but the routed experts initialised as `init_model(cfg, seed)` would
  (one jitted init whose expert outputs are dead code, so XLA never builds them), the routed experts left
  abstract: for a store written by `export-experts --init`, whose model was never trained."""
  model = abstract_model(cfg)

  def build():
    m = build_model(cfg, seed)
    return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(m)) if not _is_routed(path, cfg)}

  values = jax.jit(build, compiler_options=init_compiler_options(jax.default_backend()))()
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if path in values:
      var.set_value(values[path])
  return model


# ---------------------------------------------------------------------------- the runtime

class StoreRuntime:
  """Decoding with routed experts from the store's `levels` and every other weight from `model` (one device)."""

  def __init__(self, cfg: Config, model, levels: ExpertLevels, tier_mask: Any = None,
               programs: dict[str, Program] | None = None):
    """tier_mask: optional bool [T], the TierSet every MoE layer routes among (litejax.inference.tiersets).
    programs: the jitted programs to run (store_programs.build_programs(); default: a fresh set)."""
    self.cfg, self.levels = decode_config(cfg), levels
    self.tier_mask = None if tier_mask is None else jnp.asarray(tier_mask, bool)
    self.prefill_cfg = prefill_config(cfg)
    if self.prefill_cfg.moe.dispatch != 'dropless':
      raise ValueError('moe.eval_capacity_factor: decoding from a store needs dropless prefill (null)')
    self.programs = build_programs() if programs is None else programs
    self._compiled_before = jaxcompat.compiled_variants(self.programs['moe_pre'].fn)   # shared programs
    self.dt = DTYPES[cfg.model.dtype]
    self.layers = model_layers(model)
    self.moe = [l for l in self.layers if l.is_moe]
    if [l.index for l in self.moe] != list(levels.store.layers):
      raise ValueError(f'the store holds layers {levels.store.layers}, the model has MoE layers '
                       f'{[l.index for l in self.moe]}')
    self.pregate = cfg.moe.pregate
    if self.pregate and levels.opts.lookahead:
      raise ValueError(f'--lookahead: the model is pre-gated (moe.pregate={self.pregate}): its experts are '
                       f'fetched exactly {self.pregate} MoE layer(s) ahead and no lookahead routers run; use --lookahead 0')
    if self.pregate:
      levels.expect_exact(self.pregate)
    # pre-gated: MoE layer -> the MoE layer D ahead, whose experts it chooses
    self.gate_target = {l.index: t for l, t in zip(self.moe, self.moe[self.pregate:])} if self.pregate else {}
    self.ahead = dict(zip((l.index for l in self.moe), stacked_gates(self.moe, levels.opts.lookahead)))
    self.next_moe = {l.index: [m.index for m in self.moe[j + 1:j + 1 + levels.opts.lookahead]]
                     for j, l in enumerate(self.moe)}
    self.embed = model.embed[...]
    self.w_out = model.output_weights()
    self.final_norm = nnx.split(model.final_norm)
    self.kind = cfg.moe.expert_kind
    self.num_experts = cfg.moe.experts_total
    self.step_stall_s: list[float] = []    # per decode step of the last generate: seconds inside resolve
    self.decode_stall_s = 0.0              # the last generate's decode steps together
    self.decode_io_wait_s = 0.0            # of it, waiting on I/O (LevelCounters.io_wait_s)
    self.prefill_counters = None           # a copy of the levels' counters after the last generate's prefill

  def compiles(self) -> int:
    """Variants of the `moe_pre` program compiled since this runtime was made (one per new (batch, tokens)
    it ran; programs shared with another runtime count only what this one added)."""
    return jaxcompat.compiled_variants(self.programs['moe_pre'].fn) - self._compiled_before

  def forward(self, tokens_bs: np.ndarray, positions_bs: np.ndarray | None, cache: list,
              hooks: Hooks = DEFAULT_HOOKS) -> tuple[jax.Array, list]:
    """Logits [B, S, V] f32 of S new tokens per row at `positions_bs` (None: 0..S-1, the prefill),
    reading and writing `cache` (kv_cache.init_cache(..., per_layer=True))."""
    run = hooks.call
    x = run(self.programs['_embed'], self.embed, jnp.asarray(tokens_bs), self.dt)
    pos = None if positions_bs is None else jnp.asarray(positions_bs, jnp.int32)
    x = (self._pregated_layers if self.pregate else self._layers)(x, pos, cache, hooks)
    return run(self.programs['_head'], *self.final_norm, x, self.w_out), cache

  def _layers(self, x, pos, cache: list, hooks: Hooks):
    """The residual stream after every layer (module docstring; lookahead when opts.lookahead)."""
    run, progs, opts = hooks.call, self.programs, self.levels.opts
    pending = None    # the last lookahead's (predictions, target layers), read after the next dispatch
    for layer in self.layers:
      kv = cache[layer.index]
      if not layer.is_moe:
        x, cache[layer.index] = run(progs['dense_layer'], layer.graphdef, layer.state, x, pos, kv)
        pending = self._prefetch(pending, hooks)
        continue
      x, h_nd, e_nk, w_nk, g_nk, cache[layer.index] = run(progs['moe_pre'], layer.graphdef, layer.state, x, pos,
                                                           kv, self.tier_mask)
      pending = self._prefetch(pending, hooks)     # the device runs this layer's moe_pre meanwhile
      e_nk_host, g_host = hooks.device_get((e_nk, g_nk))   # the round trip
      y = self._experts(layer.index, h_nd, np.asarray(e_nk_host), np.asarray(g_host), hooks)
      x = run(progs['finish'], layer.graphdef, layer.state, x, h_nd, y, w_nk)
      targets = self.next_moe[layer.index]
      if opts.lookahead and targets:   # prefetch from the stream entering the next layer (module docstring)
        pending = (run(progs['lookahead'], layer.gate.norm_graphdef, self.cfg.moe, opts.lookahead,
                       opts.lookahead_width, self.ahead[layer.index], x, self.tier_mask), targets)
    self._prefetch(pending, hooks)
    return x

  def _pregated_layers(self, x, pos, cache: list, hooks: Hooks):
    """The residual stream after every layer of a pre-gated model (module docstring)."""
    run, progs = hooks.call, self.programs
    chosen = {}    # MoE layer -> its routing on device (ids, weights, groups) and its (ids, groups) on the host
    for layer in self.layers:
      kv = cache[layer.index]
      if not layer.is_moe:
        x, cache[layer.index] = run(progs['dense_layer'], layer.graphdef, layer.state, x, pos, kv)
        continue
      if layer.index in chosen:     # chosen D MoE layers ago
        x, h_nd, cache[layer.index] = run(progs['moe_attend'], layer.graphdef, layer.state, x, pos, kv)
        (_, w_nk, _), (e_host, g_host) = chosen.pop(layer.index)
      else:                         # one of the first D: routes its own input, and the host waits for it
        x, h_nd, e_nk, w_nk, g_nk, cache[layer.index] = run(progs['moe_pre'], layer.graphdef, layer.state, x, pos,
                                                             kv, self.tier_mask)
        e_host, g_host = hooks.device_get((e_nk, g_nk))
      target = self.gate_target.get(layer.index)
      if target is not None:
        ahead = run(progs['pregate'], self.cfg.moe, target.gate.router, target.gate.bias, h_nd, self.tier_mask)
        host = hooks.device_get((ahead[0], ahead[2]))
        chosen[target.index] = (ahead, host)
        self.levels.prefetch(target.index, np.asarray(host[0]).reshape(-1), self.pregate, exact=True)
      y = self._experts(layer.index, h_nd, np.asarray(e_host), np.asarray(g_host), hooks)
      x = run(progs['finish'], layer.graphdef, layer.state, x, h_nd, y, w_nk)
    return x

  def _prefetch(self, pending, hooks: Hooks) -> None:
    """Starts the prefetch of a lookahead's predictions (None: nothing pending). Called after the next
    layer's first program is dispatched, so the host waits for the predictions while the device runs it
    rather than leaving the device idle. Candidates go best first across the batch (rank-major), the
    order staging takes them in."""
    if pending is not None:
      ahead_host = hooks.device_get(pending[0])
      for d, target in enumerate(pending[1]):
        self.levels.prefetch(target, ahead_host[d].T.reshape(-1), d + 1)
    return None

  def _experts(self, layer: int, h_nd, e_nk: np.ndarray, g_nk: np.ndarray, hooks: Hooks) -> jax.Array:
    """[N, K, d] expert outputs, in as many waves as the slots need."""
    levels, program = self.levels, self.programs['experts']
    unique = list(dict.fromkeys(int(e) for e in e_nk.reshape(-1)))
    acc = jnp.zeros(e_nk.shape + (h_nd.shape[-1],), h_nd.dtype)
    groups = list(dict.fromkeys(int(g) for g in g_nk.reshape(-1))) if levels.opts.policy == 'group' else ()
    for start in range(0, len(unique), levels.num_slots):
      wave = unique[start:start + levels.num_slots]
      slot = levels.resolve(layer, wave, groups)
      lut = np.zeros(self.num_experts, np.int32)
      active = np.zeros(self.num_experts, bool)
      fb = levels.fallback_ids
      for e in wave:
        s = slot[e]
        lut[e] = s if s >= 0 else levels.num_slots + (-1 - s)
        active[e] = True
      slot_nk, active_nk = lut[e_nk], active[e_nk]
      if levels.opts.miss == 'fallback':
        width = e_nk.size   # static: at most one fallback per assignment
        fb_f = np.zeros(width, np.int32)
        fb_f[:len(fb)] = fb
        acc = hooks.call(program, self.kind, self.num_experts, levels.slots[layer].buffers, h_nd, slot_nk,
                         active_nk, acc, levels.int8[layer], fb_f)
      else:
        acc = hooks.call(program, self.kind, self.num_experts, levels.slots[layer].buffers, h_nd, slot_nk,
                         active_nk, acc)
    return acc

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, keep_logits: bool = False,
               hooks: Hooks | None = None) -> tuple[Generation, list[np.ndarray]]:
    """The generate loop (litejax.inference.decode.run_generation, batch = len(prompts)); returns
    (Generation, logits per decode step [B, V] when keep_logits: the prefill's last-position logits first).
    Sets `step_stall_s`, `decode_stall_s`, `decode_io_wait_s` and `prefill_counters`. hooks: what every
    program call and host wait goes through (default: store_programs.Hooks, which only runs them)."""
    decoder = StoreDecoder(self, DEFAULT_HOOKS if hooks is None else hooks, keep_logits)
    return run_generation(decoder, prompts, max_new_tokens, sampling, seed), decoder.kept


class StoreDecoder:
  """The generate loop's Decoder (litejax.inference.decode.Decoder) of a store runtime: one row per prompt,
  a cache sized to the request, sampling as a program of its own after the head."""

  def __init__(self, rt: StoreRuntime, hooks: Hooks, keep_logits: bool):
    self.rt, self.hooks, self.keep_logits = rt, hooks, keep_logits
    self.kept: list[np.ndarray] = []
    self._after_prefill = False

  def rows(self, prompts: int) -> int:
    return prompts

  def begin(self, req: Request) -> None:
    b, p = req.tokens_bp.shape
    self.req = req
    self.cache = kv_cache.init_cache(self.rt.cfg, None, b, p + req.max_new_tokens, per_layer=True)
    self.samp = req.sampling.as_arrays()
    self.rt.step_stall_s = []

  def _sample(self, logits_bv, key) -> np.ndarray:
    self.logits_bv = logits_bv
    next_b = self.hooks.call(self.rt.programs['_sample'], logits_bv, key, self.samp)
    return np.asarray(self.hooks.device_get(next_b))

  def prefill(self) -> np.ndarray:
    req = self.req
    logits_bpv, self.cache = self.rt.forward(req.tokens_bp, None, self.cache, self.hooks)
    last_bv = jnp.take_along_axis(logits_bpv, jnp.asarray(req.lengths_b - 1)[:, None, None], axis=1)[:, 0]
    self.host = self._sample(last_bv, req.key)
    return self.host

  def step(self, positions_b: np.ndarray, index: int) -> np.ndarray:
    self._step_stall0 = self.rt.levels.counters.stall_s
    logits_b1v, self.cache = self.rt.forward(self.host[:, None], positions_b[:, None], self.cache, self.hooks)
    self.host = self._sample(logits_b1v[:, 0], jax.random.fold_in(self.req.key, index))
    return self.host

  def end_token(self) -> None:
    rt = self.rt
    rt.levels.end_step()           # settles the token's recall and wasted reads into the counters
    c = rt.levels.counters
    if self._after_prefill:
      rt.step_stall_s.append(c.stall_s - self._step_stall0)
    else:                          # after the prefill: decode steps count from here
      self._after_prefill, rt.prefill_counters = True, copy.deepcopy(c)
    rt.decode_stall_s = c.stall_s - rt.prefill_counters.stall_s
    rt.decode_io_wait_s = c.io_wait_s - rt.prefill_counters.io_wait_s
    if self.keep_logits:
      self.kept.append(np.asarray(self.logits_bv))

  def compiles(self) -> int:
    return self.rt.compiles()

  def experts(self) -> None:
    return None
