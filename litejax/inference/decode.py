"""Decoding runtime: a preallocated, sharded KV cache, one prefill call, one jitted decode step, and the
generate loop every decoding runtime runs (`run_generation`; the expert store's runtime too).

The cache layout is litejax.model.kv_cache's; prefill and the step run the model's own forward
(`Transformer.__call__(..., cache=)`).

Batches of prompts of different lengths are right-padded to a common length P. Prefill runs all P
positions at once and fills cache entries 0..P-1; the first new token of row b comes from position
len_b - 1. Decode step j then feeds each row's last token at its own position len_b + j, writes that
entry and attends to entries 0..len_b + j: the padding a row's prompt left in the cache is masked
until it is overwritten, so a row's tokens equal decoding its prompt alone.

Routing is dropless while decoding (litejax.model.moe.dropless; expert-parallel: ep_plan.plan's dropless mode).
Prefill uses `moe.eval_capacity_factor` (null: dropless too). The decode step compiles once per
(batch, max_len): sampling settings, positions and the step counter are traced arrays.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from litejax import jaxcompat, sharding as shd
from litejax.config import Config
from litejax.inference.sampling import Sampling, sample
from litejax.model import kv_cache
from litejax.model.transformer import abstract_model

# Calls into the runtime `generate` makes per decode step, each costing host time beyond the step's
# kernels (hardware.Chip.call_overhead_s; the latency model's host term): the positions' device_put,
# the step index's device_put, the jitted step's dispatch, the next tokens' device_get.
HOST_CALLS_PER_STEP = 4


def decode_config(cfg: Config) -> Config:
  """The config the decode step runs: dropless routing."""
  return cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch='dropless'))


def prefill_config(cfg: Config) -> Config:
  """The config prefill runs: capacity factor moe.eval_capacity_factor, or dropless when it is null."""
  m = cfg.moe
  if m.eval_capacity_factor is None:
    return decode_config(cfg)
  return cfg.replace(moe=dataclasses.replace(m, capacity_factor=m.eval_capacity_factor))


# ---------------------------------------------------------------------------- jitted programs

@dataclasses.dataclass
class Runtime:
  """The jitted prefill and decode step for one (cfg, mesh, batch, max_len), and their shardings.

  prefill(params, extra, cache, tokens [B, P], lengths [B], key, sampling)
      -> (first new token [B], logits [B, P, V], cache)
  step(params, extra, cache, tokens [B], positions [B], key, step_index, sampling)
      -> (next token [B], logits [B, V], cache)
  The cache argument is donated in both.
  """
  cfg: Config
  mesh: Mesh
  batch: int
  max_len: int
  prefill: Any
  step: Any
  params_shardings: Any
  extra_shardings: Any
  cache_shardings: Any
  with_routing: bool = False       # prefill and step also return expert ids (see make_runtime)

  @property
  def batch_ranks(self) -> int:
    s = shd.mesh_sizes(self.mesh)
    return s['data'] * s['expert']

  def rows(self, x) -> jax.Array:
    """int32 per-row values (tokens, positions) placed as the step expects them: a committed array
    with the batch sharding. Uncommitted host arrays would compile a second variant of the step."""
    return jax.device_put(np.asarray(x, np.int32), shd.logical_sharding(self.mesh, ('batch',)))

  def replicated(self, tree):
    """Scalars (key, step index, sampling settings) placed as the step expects them."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def place(self, params, extra):
    """Puts model state (e.g. from a one-device model) into the runtime's shardings."""
    return jax.device_put(params, self.params_shardings), jax.device_put(extra, self.extra_shardings)

  def abstract_step_args(self) -> tuple:
    """ShapeDtypeStructs (with shardings) of the decode step's arguments: `step.trace(*args)` lowers
    it without allocating anything."""
    graphdef, params, extra = nnx.split(abstract_model(self.cfg), nnx.Param, ...)
    del graphdef

    def attach(tree, shardings):
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    rows = shd.logical_sharding(self.mesh, ('batch',))
    rep = NamedSharding(self.mesh, P())
    ints = jax.ShapeDtypeStruct((self.batch,), jnp.int32, sharding=rows)
    return (attach(params, self.params_shardings), attach(extra, self.extra_shardings),
            attach(kv_cache.cache_shapes(self.cfg, self.batch, self.max_len), self.cache_shardings), ints, ints,
            jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            jax.eval_shape(lambda: Sampling().as_arrays()))


def make_runtime(cfg: Config, mesh: Mesh, batch: int, max_len: int, with_routing: bool = False) -> Runtime:
  """Builds (does not compile) prefill and the decode step. batch must divide over data·expert ranks.

  with_routing (for inspection, e.g. experts/notebooks/decode.ipynb): prefill and step also return
  the routed expert ids, int32 [MoE layers, B, P, K] and [MoE layers, B, K]; the default programs
  neither compute nor return them."""
  shd.validate_mesh(cfg, mesh, batch)
  if max_len < 2:
    raise ValueError(f'max_len: must be >= 2 (a prompt token and a new one), got {max_len}')
  graph_step = nnx.split(abstract_model(decode_config(cfg)), nnx.Param, ...)[0]
  graph_prefill = nnx.split(abstract_model(prefill_config(cfg)), nnx.Param, ...)[0]
  _, params, extra = nnx.split(abstract_model(cfg), nnx.Param, ...)
  params_sh, extra_sh = shd.state_shardings(params, mesh), shd.state_shardings(extra, mesh)
  cache_sh = kv_cache.cache_shardings(cfg, mesh, batch, max_len)
  rows = shd.logical_sharding(mesh, ('batch',))
  rep = NamedSharding(mesh, P())

  def forward(graphdef, params, extra, tokens_bs, positions_bs, cache):
    """(logits, cache, and with_routing the expert ids int32 [MoE layers, B, S, K] in layer order)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):   # MoE dispatch follows the mesh
      logits, stats, cache = nnx.merge(graphdef, params, extra)(tokens_bs, positions_bs=positions_bs, cache=cache)
    if not with_routing:
      return logits, cache
    b, s = tokens_bs.shape
    ids = stats.expert_ids
    ids = jnp.zeros((0, b, s, cfg.moe.k_active), jnp.int32) if ids is None else ids.reshape(ids.shape[0], b, s, -1)
    return logits, cache, ids

  def prefill(params, extra, cache, tokens_bp, lengths_b, key, sampling):
    out = forward(graph_prefill, params, extra, tokens_bp, None, cache)   # positions 0..P-1
    logits_bpv, cache = out[:2]
    last_bv = jnp.take_along_axis(logits_bpv, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    return (sample(last_bv, key, sampling), logits_bpv, cache) + out[2:]

  def step(params, extra, cache, tokens_b, positions_b, key, step_index, sampling):
    out = forward(graph_step, params, extra, tokens_b[:, None], positions_b[:, None], cache)
    logits_bv, cache = out[0][:, 0], out[1]
    ids = (out[2][:, :, 0],) if with_routing else ()
    return (sample(logits_bv, jax.random.fold_in(key, step_index), sampling), logits_bv, cache) + ids

  samp_sh = Sampling(rep, rep, rep)
  ids_sh = (rep,) if with_routing else ()
  prefill_jit = jax.jit(
      prefill, in_shardings=(params_sh, extra_sh, cache_sh, shd.logical_sharding(mesh, ('batch', 'sequence')),
                             rows, rep, samp_sh),
      out_shardings=(rows, shd.logical_sharding(mesh, ('batch', 'sequence', 'vocab')), cache_sh) + ids_sh,
      donate_argnums=(2,))
  step_jit = jax.jit(
      step, in_shardings=(params_sh, extra_sh, cache_sh, rows, rows, rep, rep, samp_sh),
      out_shardings=(rows, shd.logical_sharding(mesh, ('batch', 'vocab')), cache_sh) + ids_sh, donate_argnums=(2,))
  return Runtime(cfg, mesh, batch, max_len, prefill_jit, step_jit, params_sh, extra_sh, cache_sh, with_routing)


# ---------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Generation:
  """What the generate loop (`run_generation`) returns: new tokens per prompt and timings (seconds)."""
  tokens: list[list[int]]
  ttft_s: float                    # prefill + first token, compile included on a cold runtime
  step_s: list[float]              # one entry per decode step (every row gets a token)
  interrupted: bool
  compiles: int                    # compiled variants of the runtime's decode program so far
  # with_routing runtimes: per new token j, the experts that computed it, int [MoE layers, prompts, K]
  # (token 0: the prompt's last position in prefill; token j: decode step j, fed token j - 1)
  experts: list | None = None


def pad_prompts(prompts: list[list[int]], batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to one length and appends one-token dummy rows up to `batch` rows.
  Returns (tokens int32 [batch, P], lengths int32 [batch])."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('prompts: every prompt needs at least one token')
  if len(prompts) > batch:
    raise ValueError(f'{len(prompts)} prompts do not fit a batch of {batch}')
  width = max(len(p) for p in prompts)
  tokens = np.zeros((batch, width), np.int32)
  lengths = np.ones((batch,), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    lengths[i] = len(p)
  return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation's inputs, as `run_generation` hands them to a decoder."""
  tokens_bp: np.ndarray       # int32 [rows, P] right-padded prompts (dummy rows at the end)
  lengths_b: np.ndarray       # int32 [rows] prompt lengths
  prompts: int                # real rows (the first `prompts`)
  max_new_tokens: int
  key: jax.Array
  sampling: Sampling


class Decoder(Protocol):
  """A decoding runtime with its weights, as the generate loop drives it. Timed: `prefill` (the time to
  first token) and each `step`; `end_token` (bookkeeping after each token) is not."""

  def rows(self, prompts: int) -> int:
    """Batch rows the prompts are padded to."""

  def begin(self, req: Request) -> None:
    """Validates the request against the runtime (ValueError naming the constraint) and readies a
    zeroed cache."""

  def prefill(self) -> np.ndarray:
    """The first new token of every row, on the host."""

  def step(self, positions_b: np.ndarray, index: int) -> np.ndarray:
    """Decode step `index` (1, 2, ...): feeds every row's last token at `positions_b`; the next tokens."""

  def end_token(self) -> None:
    """After the prefill and after each step."""

  def compiles(self) -> int:
    """Compiled variants of the runtime's decode program so far."""

  def experts(self) -> list | None:
    """Per new token the experts that computed it (runtimes that record them), else None."""


def run_generation(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int,
                   sampling: Sampling = Sampling(), seed: int = 0,
                   on_step: Callable[[list[list[int]]], None] | None = None) -> Generation:
  """The generate loop: `max_new_tokens` per prompt from `decoder`. Ctrl-C (KeyboardInterrupt) stops after
  the current step and returns what was generated so far (interrupted=True)."""
  sampling.validate()
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens: must be >= 1, got {max_new_tokens}')
  tokens, lengths = pad_prompts(prompts, decoder.rows(len(prompts)))
  n = len(prompts)
  out: list[list[int]] = [[] for _ in range(n)]
  step_s: list[float] = []
  interrupted, ttft = False, 0.0
  try:
    decoder.begin(Request(tokens, lengths, n, max_new_tokens, jax.random.key(seed), sampling))
    t0 = time.perf_counter()
    host = decoder.prefill()
    ttft = time.perf_counter() - t0
    decoder.end_token()
    for j in range(max_new_tokens):
      for i in range(n):
        out[i].append(int(host[i]))
      if on_step is not None:
        on_step(out)
      if j == max_new_tokens - 1:
        break
      t0 = time.perf_counter()
      host = decoder.step(lengths + j, j + 1)
      step_s.append(time.perf_counter() - t0)
      decoder.end_token()
  except KeyboardInterrupt:
    interrupted = True
  return Generation(out, ttft, step_s, interrupted, decoder.compiles(), decoder.experts())


class ResidentDecoder:
  """The Decoder of a `Runtime` with its weights (placed in the runtime's shardings)."""

  def __init__(self, rt: Runtime, params, extra):
    self.rt = rt
    self.params, self.extra = params, extra
    self._experts: list = []
    self._ids = None

  def rows(self, prompts: int) -> int:
    return self.rt.batch

  def begin(self, req: Request) -> None:
    rt = self.rt
    if req.tokens_bp.shape[1] + req.max_new_tokens - 1 > rt.max_len:
      raise ValueError(f'longest prompt ({req.tokens_bp.shape[1]}) + max_new_tokens ({req.max_new_tokens}) - 1 '
                       f'exceeds the cache length {rt.max_len}')
    self.req = req
    self.params, self.extra = rt.place(self.params, self.extra)   # a no-op when already placed
    self.key, self.samp = rt.replicated((req.key, req.sampling.as_arrays()))
    self.cache = kv_cache.init_cache(rt.cfg, rt.mesh, rt.batch, rt.max_len)

  def prefill(self) -> np.ndarray:
    rt, req = self.rt, self.req
    self.next_b, _, self.cache, *ids = rt.prefill(self.params, self.extra, self.cache, req.tokens_bp,
                                                  rt.rows(req.lengths_b), self.key, self.samp)
    host = np.asarray(jax.device_get(self.next_b))
    if ids:
      n = req.prompts
      self._experts.append(np.asarray(ids[0])[:, np.arange(n), req.lengths_b[:n] - 1])
    return host

  def step(self, positions_b: np.ndarray, index: int) -> np.ndarray:
    # the HOST_CALLS_PER_STEP calls; a NumPy index is one put, not two
    rt = self.rt
    self.next_b, _, self.cache, *ids = rt.step(self.params, self.extra, self.cache, self.next_b,
                                               rt.rows(positions_b), self.key, rt.replicated(np.int32(index)),
                                               self.samp)
    self._ids = ids[0] if ids else None
    return np.asarray(jax.device_get(self.next_b))

  def end_token(self) -> None:
    if self._ids is not None:
      self._experts.append(np.asarray(self._ids)[:, :self.req.prompts])
      self._ids = None

  def compiles(self) -> int:
    return jaxcompat.compiled_variants(self.rt.step)

  def experts(self) -> list | None:
    return self._experts if self.rt.with_routing else None


def generate(rt: Runtime, params, extra, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             on_step: Callable[[list[list[int]]], None] | None = None) -> Generation:
  """Generates `max_new_tokens` per prompt with the resident runtime `rt` (`run_generation`)."""
  return run_generation(ResidentDecoder(rt, params, extra), prompts, max_new_tokens, sampling, seed, on_step)
