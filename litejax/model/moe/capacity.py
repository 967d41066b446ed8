"""How many assignments each expert takes, and which dispatch path runs: pure rules over `MoEConfig`."""
from __future__ import annotations

import math

from litejax.config import MoEConfig


def capacity(cfg: MoEConfig, num_tokens: int, num_experts: int | None = None) -> int:
  """Slots per expert: C = max(ceil(capacity_factor * N * K / E), min_capacity).

  N is the number of tokens routed together: all tokens one device (or one expert-parallel source
  rank) feeds to one MoE layer call, i.e. local_batch * seq_len.
  """
  e = num_experts or cfg.experts_total
  return max(math.ceil(cfg.capacity_factor * num_tokens * cfg.k_active / e - 1e-9), cfg.min_capacity)


def resolve_dispatch(cfg: MoEConfig, num_tokens: int, num_experts: int | None = None) -> str:
  """The dispatch path that runs: `auto` becomes `capacity` or `gather` by regime.

  Per MoE call the capacity path reads every expert's weights once (E·d·h per matrix) and does E·C
  rows of work; gather copies one weight slice per assignment (N·K·d·h) and does N·K rows. Gather
  wins only when most experts are idle: E >= auto_gather_ratio · N·K. Below that the buffer's rows
  stay bounded per token, E·C < capacity_factor·N·K + E < (capacity_factor + auto_gather_ratio)·N·K,
  so the per-token work is O(K) whatever E is on either path.
  """
  if cfg.dispatch != 'auto':
    return cfg.dispatch
  e = num_experts or cfg.experts_total
  return 'gather' if e >= cfg.auto_gather_ratio * num_tokens * cfg.k_active else 'capacity'


def dropless_tiles(num_assignments: int, num_experts: int) -> tuple[int, int]:
  """(rows per tile t, static tile count) of the CPU dropless dispatch (litejax.model.moe.dropless).

  Each expert's assignments fill ceil(c_e / t) tiles of t rows, so the tiles needed are at most
  (A + min(E, A)·(t - 1)) / t for A = N·K assignments: at most min(E, A)·(t - 1) padding rows. t is the
  largest power of two keeping that padding within 1/8 of A (capped at 128 rows): t = 1 (no padding)
  at a few tokens per step, larger tiles (fewer weight gathers) when many tokens share each expert.
  """
  a, busy = num_assignments, min(num_experts, num_assignments)
  t = 1
  while t < 128 and 2 * t - 1 <= a / (8 * busy):
    t *= 2
  return t, (a + busy * (t - 1)) // t
