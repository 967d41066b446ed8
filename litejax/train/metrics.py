"""Training metrics: per-level load entropy (in-graph), a JSONL writer, and the end-of-run PNG.

matplotlib is imported only when a plot is drawn, so training without plots never loads it.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np


def load_entropy(counts_lb) -> Any:
  """Entropy of each MoE layer's selection counts over its B branches (experts, groups or tiers),
  divided by log B and averaged over layers: 1.0 is a perfectly even load, 0.0 everything on one.

  counts_lb: [moe layers, B] selection counts (0 layers or one branch -> 0.0).
  """
  if counts_lb.shape[0] == 0 or counts_lb.shape[1] < 2:
    return jnp.zeros((), jnp.float32)
  load = counts_lb.astype(jnp.float32)
  p = load / jnp.maximum(load.sum(axis=-1, keepdims=True), 1.0)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return jnp.mean(h) / math.log(counts_lb.shape[1])


def level_load_entropies(stats, moe_cfg) -> dict[str, Any]:
  """'expert_load_entropy', and 'tier_load_entropy' / 'group_load_entropy' for levels with more than
  one branch (per parent: G > 1 for groups), from stacked `litejax.model.moe.block.MoEStats`. The group figure
  is over all T·G groups."""
  out = {'expert_load_entropy': load_entropy(stats.tokens_per_expert)}
  if moe_cfg.num_tiers > 1:
    out['tier_load_entropy'] = load_entropy(stats.tokens_per_tier)
  if moe_cfg.groups_per_tier > 1:
    out['group_load_entropy'] = load_entropy(stats.tokens_per_group)
  return out


class MetricsWriter:
  """Appends one JSON object per line and flushes it, so a killed run keeps every logged step."""

  def __init__(self, path: str | pathlib.Path, keep_until: int | None = None):
    """keep_until=None starts the file afresh; an int keeps the records with step <= keep_until
    (a resumed run drops what the interrupted one logged after its checkpoint, then appends)."""
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_until is not None and self.path.exists():
      kept = [r for r in read_metrics(self.path) if r.get('step', 0) <= keep_until]
    # The kept records go to a temporary file renamed over the old one, so a kill during the rewrite
    # leaves either the old file or the new one, never a half-written file.
    tmp = self.path.with_name(self.path.name + '.tmp')
    with tmp.open('w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, allow_nan=True) + '\n' for r in kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    self._f = self.path.open('a', encoding='utf-8')

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record, allow_nan=True) + '\n')
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a metrics JSONL file, in order."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(history: list[dict[str, Any]], path: str | pathlib.Path, cfg=None) -> pathlib.Path:
  """Writes a PNG: train/val loss against step, and the last logged per-expert load of each MoE layer."""
  import matplotlib
  matplotlib.use('Agg')   # no display needed (headless machines, pods)
  import matplotlib.pyplot as plt

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  loads = [r['expert_load'] for r in history if r.get('expert_load')]
  fig, axes = plt.subplots(1, 2 if loads else 1, figsize=(12 if loads else 6, 4.2), squeeze=False)
  ax = axes[0, 0]
  steps = [r['step'] for r in history]
  ax.plot(steps, [r['loss'] for r in history], label='train loss', lw=1.2)
  val = [(r['step'], r['val_loss']) for r in history if r.get('val_loss') is not None]
  if val:
    ax.plot(*zip(*val), 'o-', label='val loss', lw=1.5)
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats/token)')
  ax.set_title('loss')
  ax.grid(alpha=0.3)
  ax.legend()
  if loads:
    load_le = np.asarray(loads[-1])
    ax = axes[0, 1]
    im = ax.imshow(load_le * load_le.shape[1], aspect='auto', cmap='viridis', vmin=0)
    ax.set_xlabel('expert')
    ax.set_ylabel('MoE layer')
    ax.set_yticks(range(load_le.shape[0]))
    ax.set_title(f'expert load at step {[r["step"] for r in history if r.get("expert_load")][-1]} '
                 '(1.0 = even share)')
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
