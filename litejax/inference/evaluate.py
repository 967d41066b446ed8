"""Evaluation of a checkpoint on a token stream: mean loss per predicted token and perplexity.

The stream is cut into non-overlapping windows of S tokens (the last one shorter if fewer remain, and dropped
below 2 tokens); each window is one forward from position 0 predicting its tokens 2..S from the ones before
(S - 1 predictions), as Hugging Face's perplexity recipe with stride = S. Routing is prefill's
(litejax.inference.decode.prefill_config: dropless unless moe.eval_capacity_factor is set), so a window's
loss does not depend on the other windows in its batch. Windows go B at a time into one compiled program
(shorter ones padded and masked), every process on its own mesh's batch ranks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litejax import sharding as shd
from litejax.inference.decode import prefill_config
from litejax.model.transformer import abstract_model


@dataclasses.dataclass(frozen=True)
class EvalResult:
  loss: float            # mean negative log-likelihood per predicted token (nats)
  perplexity: float      # exp(loss)
  tokens: int            # predicted tokens counted
  windows: int
  seq_len: int


def window_starts(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
  """(start, length) of each window: non-overlapping, S tokens each, the last the remainder (kept from 2)."""
  if seq_len < 2:
    raise ValueError(f'--seq-len: must be >= 2 (a token and the one it predicts), got {seq_len}')
  return [(s, min(seq_len, num_tokens - s)) for s in range(0, num_tokens, seq_len) if num_tokens - s >= 2]


def make_loss_fn(session):
  """Jitted (params, extra, tokens [B, S], lengths [B]) -> (summed NLL f32 [], predicted tokens int32 [])."""
  graphdef = nnx.split(abstract_model(prefill_config(session.cfg)), nnx.Param, ...)[0]
  mesh = session.mesh

  def loss(params, extra, tokens_bs, lengths_b):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):   # MoE dispatch follows the mesh
      logits, _ = nnx.merge(graphdef, params, extra)(tokens_bs)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_bs[:, 1:, None], axis=-1)[..., 0]
    predicted = jnp.arange(tokens_bs.shape[1] - 1)[None, :] < (lengths_b[:, None] - 1)
    return jnp.sum(jnp.where(predicted, nll, 0.0)), jnp.sum(predicted.astype(jnp.int32))

  return jax.jit(loss)


def evaluate(session, tokens: np.ndarray, seq_len: int, batch: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
  """The loss of `session`'s model (litejax.inference.session.Session) on the 1-D token array `tokens` in windows
  of `seq_len`, `batch` windows per call (default: one per batch rank of the mesh; rounded up to a multiple of
  them). progress(done, total) after each call. ValueError naming the flag for bad input."""
  tokens = np.asarray(tokens).reshape(-1)
  windows = window_starts(int(tokens.shape[0]), seq_len)
  if not windows:
    raise ValueError(f'--data: {tokens.shape[0]} tokens; evaluation needs at least 2')
  s = shd.mesh_sizes(session.mesh)
  ranks = s['data'] * s['expert']
  if batch is not None and batch < 1:
    raise ValueError(f'--batch: must be >= 1, got {batch}')
  rows = math.ceil((batch or ranks) / ranks) * ranks
  fn = make_loss_fn(session)
  place_tokens = shd.logical_sharding(session.mesh, ('batch', 'sequence'))
  place_rows = shd.logical_sharding(session.mesh, ('batch',))
  total_nll, total_count = 0.0, 0
  calls = math.ceil(len(windows) / rows)
  with jax.set_mesh(session.mesh):
    for c in range(calls):
      chunk = windows[c * rows:(c + 1) * rows]
      tokens_bs = np.zeros((rows, seq_len), np.int32)
      lengths = np.zeros((rows,), np.int32)   # padding rows predict nothing
      for i, (start, n) in enumerate(chunk):
        tokens_bs[i, :n] = tokens[start:start + n]
        lengths[i] = n
      nll, count = fn(session.params, session.extra, jax.device_put(tokens_bs, place_tokens),
                      jax.device_put(lengths, place_rows))
      total_nll += float(nll)
      total_count += int(count)
      if progress:
        progress(c + 1, calls)
  loss = total_nll / total_count
  return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=total_count, windows=len(windows),
                    seq_len=seq_len)
