"""The training objective: the forward pass's cross-entropy, the router losses added to it, what a
step reports, and the loss-free balancing update of the selection biases.

Loss = cross-entropy + moe.aux_loss_weight · Σ_levels load_balance_loss + moe.z_loss_weight · z_loss
(router terms averaged over MoE layers). The `loss` metric is the cross-entropy alone (nats per
token; per byte for the byte tokenizer), so MoE and dense runs compare directly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from litejax.config import Config
from litejax.model.moe.block import MoEStats
from litejax.model.transformer import layer_mean
from litejax.train.metrics import level_load_entropies


def forward_loss(graphdef, params, extra, inputs_bs, targets_bs, tier_mask=None):
  """(mean cross-entropy of targets_bs under the model (graphdef, params, extra) on inputs_bs, MoEStats);
  tier_mask: optional TierSet (bool [T]) every MoE layer routes among."""
  model = nnx.merge(graphdef, params, extra)
  logits_bsv, stats = model(inputs_bs, tier_mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_bsv, targets_bs).mean()
  return ce, stats


def loss_terms(cfg: Config, ce, stats: MoEStats):
  """(total loss, (aux_loss, z_loss)): cross-entropy plus the weighted router losses."""
  m = cfg.moe
  aux_loss = jnp.sum(layer_mean(stats.load_balance_loss))
  z_loss = layer_mean(stats.z_loss)
  return ce + m.aux_loss_weight * aux_loss + m.z_loss_weight * z_loss, (aux_loss, z_loss)


def step_metrics(cfg: Config, ce, total, aux_loss, z_loss, grad_norm, stats: MoEStats) -> dict[str, jax.Array]:
  """What a train step reports (either expert update)."""
  drop_levels = layer_mean(stats.drop_fraction)
  return {
      'loss': ce, 'total_loss': total, 'aux_loss': aux_loss, 'z_loss': z_loss,
      'drop_fraction': drop_levels[2],                       # expert level: assignments dropped
      'drop_fraction_levels': drop_levels,
      'grad_norm': grad_norm,
      **level_load_entropies(stats, cfg.moe),
      'tokens_per_expert': stats.tokens_per_expert,          # [moe layers, E] assignments
      'finite': jnp.isfinite(total) & jnp.isfinite(grad_norm),
  }


def update_bias(graphdef, params, extra, stats: MoEStats, cfg: Config):
  """Loss-free balancing: each MoE block nudges every level's selection bias toward even load."""
  model = nnx.merge(graphdef, params, extra)
  blocks = model.moe_blocks()
  rate = cfg.moe.bias_update_rate
  if cfg.model.scan_layers:
    blocks[0].update_bias(stats, rate)        # one stacked block: biases [periods, ...] as stats
  else:
    for i, blk in enumerate(blocks):
      blk.update_bias(jax.tree.map(lambda a, i=i: a[i], stats), rate)
  return nnx.split(model, nnx.Param, ...)[2]
