"""The constraints a litejax config must meet beyond each field's type: one rule per combination of
fields, each failure one line naming the field(s) and the constraint. Pure Python over the config's
sections (duck-typed: this module sits below litejax.config, which turns a `Violation` into its
ConfigError).
"""
from __future__ import annotations

import dataclasses
import functools
import math

# Upper bound that only catches absurd values (each loop over layers is Python-level work at trace time).
MAX_LAYERS = 4096


class Violation(ValueError):
  """A violated constraint: the message names the field and the constraint."""


@functools.lru_cache(maxsize=64)   # is_moe_layer asks once per layer
def parse_layer_list(text: str) -> frozenset[int]:
  """The 0-based layers of model.dense_layers: '0,3', ranges '0-2,5' (ends included), '' for none."""
  try:
    ranges = [[int(x) for x in p.split('-', 1)] for p in text.replace(' ', '').split(',')] if text.strip() else []
  except ValueError:
    ranges = [[1, 0]]
  if any(r[-1] < r[0] for r in ranges):
    raise Violation(f'model.dense_layers: expected 0-based layers or ranges like 0,3 or 0-2, got {text!r}')
  return frozenset(i for r in ranges for i in range(r[0], r[-1] + 1))


MLA_FIELDS = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim')
YARN_FIELDS = ('rope_factor', 'rope_original_max_len', 'rope_beta_fast', 'rope_beta_slow', 'rope_mscale',
               'rope_mscale_all_dim')


def _validate_attention(m) -> None:
  if m.attention == 'gqa':
    for name in MLA_FIELDS:
      _require(getattr(m, name) == 0, f'model.{name}: an MLA size; set only with model.attention=mla, got '
               f'{getattr(m, name)}')
    return
  _require(m.head_dim == 0, 'model.head_dim: unused by model.attention=mla (its head sizes are '
           f'model.qk_nope_head_dim/qk_rope_head_dim/v_head_dim); leave it 0, got {m.head_dim}')
  for name in MLA_FIELDS[1:]:
    _require(getattr(m, name) > 0, f'model.{name}: must be > 0 with model.attention=mla, got {getattr(m, name)}')
  _require(m.q_lora_rank >= 0, f'model.q_lora_rank: must be >= 0 (0 = a full q projection), got {m.q_lora_rank}')
  _require(m.qk_rope_head_dim % 2 == 0, f'model.qk_rope_head_dim ({m.qk_rope_head_dim}) must be even for RoPE')


def _validate_rope_scaling(m) -> None:
  if m.rope_scaling == 'none':
    defaults = {f.name: f.default for f in dataclasses.fields(m)}
    for name in YARN_FIELDS:
      _require(getattr(m, name) == defaults[name], f'model.{name}: a YaRN setting; set only with '
               f'model.rope_scaling=yarn, got {getattr(m, name)}')
    return
  _require(m.attention == 'mla', 'model.rope_scaling: yarn is implemented for model.attention=mla only')
  _require(m.rope_factor >= 1, f'model.rope_factor: must be >= 1, got {m.rope_factor}')
  _require(m.rope_original_max_len > 0,
           f'model.rope_original_max_len: must be > 0 with model.rope_scaling=yarn, got {m.rope_original_max_len}')
  _require(m.rope_beta_fast > 0 and m.rope_beta_slow > 0,
           f'model.rope_beta_fast/rope_beta_slow: must be > 0, got {m.rope_beta_fast}/{m.rope_beta_slow}')
  _require(m.rope_mscale >= 0 and m.rope_mscale_all_dim >= 0,
           'model.rope_mscale/rope_mscale_all_dim: must be >= 0 (0 = unset), got '
           f'{m.rope_mscale}/{m.rope_mscale_all_dim}')


def _validate_routing_variants(e) -> None:
  _require(e.routed_scale > 0, f'moe.routed_scale: must be > 0, got {e.routed_scale}')
  if e.expert_selection == 'pooled':
    _require(e.k_expert <= e.k_group * e.experts_per_group,
             f'moe.k_expert ({e.k_expert}) must be <= moe.k_group * moe.experts_per_group '
             f'({e.k_group * e.experts_per_group}) with moe.expert_selection=pooled')
    _require(not e.rank_aligned_groups, 'moe.rank_aligned_groups: sends a token once per chosen group with '
             'k_expert experts each; needs moe.expert_selection=per_group')
  else:
    _require(e.k_expert <= e.experts_per_group,
             f'moe.k_expert ({e.k_expert}) must be <= moe.experts_per_group ({e.experts_per_group})')
  if e.group_score == 'top2_experts':
    _require(e.score == 'sigmoid',
             'moe.group_score: top2_experts sums expert selection scores; needs moe.score=sigmoid')
    _require(e.groups_per_tier > 1, 'moe.group_score: top2_experts needs moe.groups_per_tier > 1')
    _require(e.experts_per_group >= 2,
             f'moe.group_score: top2_experts needs moe.experts_per_group >= 2, got {e.experts_per_group}')
    _require(e.k_tier == e.num_tiers, 'moe.group_score: top2_experts scores every expert of the kept tiers, so '
             f'needs moe.k_tier == moe.num_tiers (got {e.k_tier} of {e.num_tiers})')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise Violation(message)



def check(cfg) -> None:
  """Raises Violation for the first violated constraint of a litejax.config.Config (the store's
  placement is checked by litejax.config itself)."""
  m, e, t = cfg.model, cfg.moe, cfg.train
  for name in ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'seq_len', 'vocab_size'):
    _require(getattr(m, name) > 0, f'model.{name}: must be > 0, got {getattr(m, name)}')
  _require(m.num_layers <= MAX_LAYERS, f'model.num_layers: must be <= {MAX_LAYERS}, got {m.num_layers}')
  _require(m.head_dim >= 0, f'model.head_dim: must be >= 0 (0 = d_model/num_heads), got {m.head_dim}')
  _require(m.d_ff >= 0, f'model.d_ff: must be >= 0 (0 = 4*d_model), got {m.d_ff}')
  if m.attention == 'gqa':
    if m.head_dim == 0:
      _require(m.d_model % m.num_heads == 0,
               f'model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads}) '
               'when model.head_dim is not set')
    _require(m.num_heads % m.num_kv_heads == 0,
             f'model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads})')
    _require(m.resolved_head_dim % 2 == 0, f'model.head_dim ({m.resolved_head_dim}) must be even for RoPE')
  _validate_attention(m)
  _validate_rope_scaling(m)
  _require(m.moe_every >= 0, f'model.moe_every: must be >= 0, got {m.moe_every}')
  last = max(parse_layer_list(m.dense_layers), default=-1)
  _require(last < m.num_layers, f'model.dense_layers: layer {last} does not exist (0-based; num_layers={m.num_layers})')
  _require(last < 0 or not m.scan_layers, 'model.dense_layers: not supported with model.scan_layers (scans repeat '
           'identical periods of moe_every layers)')
  _require(m.rope_theta > 0, f'model.rope_theta: must be > 0, got {m.rope_theta}')
  for name in ('num_tiers', 'groups_per_tier', 'experts_per_group', 'k_tier', 'k_group', 'k_expert',
               'd_expert', 'min_capacity'):
    _require(getattr(e, name) > 0, f'moe.{name}: must be > 0, got {getattr(e, name)}')
  _require(e.k_tier <= e.num_tiers, f'moe.k_tier ({e.k_tier}) must be <= moe.num_tiers ({e.num_tiers})')
  _require(e.k_group <= e.groups_per_tier,
           f'moe.k_group ({e.k_group}) must be <= moe.groups_per_tier ({e.groups_per_tier})')
  _require(e.capacity_factor > 0, f'moe.capacity_factor: must be > 0, got {e.capacity_factor}')
  _require(e.eval_capacity_factor is None or e.eval_capacity_factor > 0,
           f'moe.eval_capacity_factor: must be > 0 or null (dropless prefill), got {e.eval_capacity_factor}')
  _require(e.num_shared_experts >= 0, f'moe.num_shared_experts: must be >= 0, got {e.num_shared_experts}')
  _require(e.d_shared >= 0, f'moe.d_shared: must be >= 0 (0 = d_expert), got {e.d_shared}')
  _require(e.auto_gather_ratio > 0, f'moe.auto_gather_ratio: must be > 0, got {e.auto_gather_ratio}')
  _require(e.bias_update_rate >= 0, f'moe.bias_update_rate: must be >= 0, got {e.bias_update_rate}')
  _require(e.bias_update_rate == 0 or e.score == 'sigmoid',
           'moe.bias_update_rate: selection-bias balancing needs moe.score=sigmoid')
  _require(e.aux_loss_weight >= 0 and e.z_loss_weight >= 0, 'moe.aux_loss_weight/z_loss_weight: must be >= 0')
  _require(e.pregate >= 0, f'moe.pregate: must be >= 0 (0 = off), got {e.pregate}')
  _require(e.pregate == 0 or e.pregate < m.num_moe_layers, f'moe.pregate ({e.pregate}) must be less than '
           f'the MoE layers ({m.num_moe_layers}): the first moe.pregate MoE layers route their own input')
  _validate_routing_variants(e)
  for name in ('data', 'expert', 'tensor'):
    v = getattr(cfg.mesh, name)
    _require(v == -1 or v > 0, f'mesh.{name}: must be > 0 or -1 (the rest), got {v}')
  _require(sum(getattr(cfg.mesh, n) == -1 for n in ('data', 'expert', 'tensor')) <= 1,
           'mesh: at most one of data/expert/tensor may be -1')
  for name in ('steps', 'batch_size', 'ckpt_every', 'keep_checkpoints', 'eval_every', 'eval_batches',
               'log_every'):
    _require(getattr(t, name) > 0, f'train.{name}: must be > 0, got {getattr(t, name)}')
  _require(t.lr > 0, f'train.lr: must be > 0, got {t.lr}')
  _require(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}')
  _require(0 <= t.warmup_steps, f'train.warmup_steps: must be >= 0, got {t.warmup_steps}')
  _require(t.grad_clip >= 0, f'train.grad_clip: must be >= 0 (0 = off), got {t.grad_clip}')
  _require(0 < t.val_fraction < 1, f'train.val_fraction: must be in (0, 1), got {t.val_fraction}')
  _require(math.isfinite(t.lr), 'train.lr: must be finite')
  _require(t.expert_optimizer == 'adamw' or t.expert_update != 'dense',
           'train.expert_optimizer: factored runs on the sparse path only; needs train.expert_update '
           f'sparse or auto, got {t.expert_update}')
