"""What a config holds in memory, from abstract shapes only (nothing is allocated): parameter counts
and the per-device bytes of parameters and optimizer state under the mesh rules.
"""
from __future__ import annotations

import math
import re

from litejax import units
from litejax.config import ConfigError


def count_model_params(cfg) -> int:
  """Parameters of the real NNX model, from abstract shapes only."""
  import jax
  from flax import nnx

  from litejax.model.transformer import abstract_model
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def state_bytes_per_device(cfg, sizes: dict[str, int], train: bool) -> dict:
  """Bytes of parameters (and, training, optimizer state) one device holds under the mesh rules.

  Forward: the abstract model's parameters. Training: the train state exactly as litejax.train.step lays
  it out (`state_layout` on an AbstractMesh of `sizes`), so `train.expert_update` and
  `train.expert_optimizer` are honoured: the dense update keeps optax AdamW's two moments in each
  parameter's dtype; the sparse update keeps the dense parameters' optax state plus each expert/router
  table's row state (lazy AdamW: two f32 moments; factored: f32 row and column statistics, O(d + h) per
  expert) and an int32 count per row. Each array's per-device shard is
  `NamedSharding(AbstractMesh(sizes), spec).shard_shape(shape)`, as jit lays it out. ConfigError when a
  mesh axis does not divide an array's dimension.
  """
  from jax.sharding import AbstractMesh

  from litejax import sharding
  mesh = AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
  if not train:
    by_table = _new_by_table()
    params, total = _sharded_bytes(_param_structs(cfg, mesh), by_table)
    return {'params': params, 'optimizer': 0.0, 'state': params, 'state_total_all_chips': total,
            'params_total_all_chips': total, 'state_by_table': by_table}
  from litejax.train import sparse_step
  from litejax.train import step as train_step
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  by_table = _new_by_table()
  params, params_total = _sharded_bytes(abstract['params'], by_table)
  opt, opt_total = _sharded_bytes(abstract['opt'], by_table)
  return {'params': params, 'optimizer': opt, 'state': params + opt, 'state_total_all_chips': params_total + opt_total,
          'params_total_all_chips': params_total, 'optimizer_total_all_chips': opt_total, 'state_by_table': by_table,
          'expert_update': sparse_step.update_mode(cfg, mesh), 'expert_optimizer': cfg.train.expert_optimizer}


# What `state_by_table` splits one device's bytes into (parameters and their optimizer state together).
TABLE_KINDS = ('experts', 'router_expert', 'other')


def _new_by_table() -> dict[str, float]:
  return {k: 0.0 for k in TABLE_KINDS}


def table_kind(path: str) -> str:
  """'experts' (a MoE block's w_in / w_gate / w_out, not the shared expert's), 'router_expert', or 'other'
  for a state leaf's key path (`jax.tree_util.keystr`, or a row state's dotted table key)."""
  dotted = '.' + re.sub(r"[\[\]'\s]+", '.', path).strip('.') + '.'
  if '.router_expert.' in dotted:
    return 'router_expert'
  if any(f'.ffn.{name}.' in dotted for name in ('w_in', 'w_gate', 'w_out')):
    return 'experts'
  return 'other'


def _param_structs(cfg, mesh) -> dict:
  """The abstract model's parameters as ShapeDtypeStructs sharded as training and serving lay them out
  (`sharding.state_shardings`: logical axes, and 'expert_group' replicated where the expert ranks do not
  divide the groups)."""
  import jax
  from flax import nnx

  from litejax import sharding
  from litejax.model.transformer import abstract_model
  state = nnx.state(abstract_model(cfg), nnx.Param)
  shardings = sharding.state_shardings(state, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return {jax.tree_util.keystr(path): jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                                           sharding=sh.get_value())
          for (path, var), sh in zip(jax.tree_util.tree_leaves_with_path(state, is_leaf=is_var),
                                     jax.tree.leaves(shardings, is_leaf=is_var))}


def _sharded_bytes(tree, by_table: dict | None = None) -> tuple[float, float]:
  """(bytes of one device's shards, bytes of the whole arrays) of a tree of sharded ShapeDtypeStructs;
  one device's bytes are also added to `by_table[table_kind(path)]`."""
  import jax
  per_device = total = 0.0
  for path, sds in jax.tree_util.tree_leaves_with_path(tree):
    nbytes = units.dtype_bytes(str(sds.dtype))
    try:
      shard = sds.sharding.shard_shape(sds.shape)
    except ValueError as e:   # jax's IndivisibleError
      raise ConfigError(f'{jax.tree_util.keystr(path)} {tuple(sds.shape)}: mesh {dict(sds.sharding.mesh.shape)} '
                        f'does not divide it ({sds.sharding.spec})') from e
    per_device += math.prod(shard) * nbytes
    if by_table is not None:
      by_table[table_kind(jax.tree_util.keystr(path))] += math.prod(shard) * nbytes
    total += math.prod(sds.shape) * nbytes
  return per_device, total
