"""Shared by the expert-store tests: a shrunk configs/store_1b.yaml (same structure: hierarchical
routing, glu experts, every layer MoE) and a TensorStore byte counter."""
import tensorstore as ts

from litejax.config import load_config

STORE_1B = 'configs/store_1b.yaml'
# 2 layers x (2 tiers x 2 groups x 4 experts) of d=16, h=8: 16 experts per layer of 1,536 B.
SMALL = ['model.d_model=16', 'model.num_heads=2', 'model.num_kv_heads=1', 'model.num_layers=2',
         'moe.num_tiers=2', 'moe.groups_per_tier=2', 'moe.experts_per_group=4', 'moe.k_tier=1', 'moe.k_group=1',
         'moe.k_expert=2', 'moe.d_expert=8']


def small_cfg(*extra):
  return load_config(STORE_1B, SMALL + list(extra))


def bytes_read(driver: str = 'file') -> int:
  """Bytes TensorStore's `driver` kvstore has read in this process so far (its own counter)."""
  for m in ts.experimental_collect_matching_metrics(f'/tensorstore/kvstore/{driver}/bytes_read'):
    return int(sum(v.get('value', 0) for v in m['values']))
  return 0
