"""What a config holds in memory, from abstract shapes only (nothing is allocated): parameter counts
and the per-device bytes of parameters and optimizer state under the mesh rules.
"""
from __future__ import annotations

import math

from litejax.config import ConfigError


def count_model_params(cfg) -> int:
  """Parameters of the real NNX model, from abstract shapes only."""
  import jax
  from flax import nnx

  from litejax.model import abstract_model
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def state_bytes_per_device(cfg, sizes: dict[str, int], train: bool) -> dict:
  """Bytes of parameters (and, training, optimizer state) one device holds under the mesh rules.

  Forward: the abstract model's parameters. Training: the train state exactly as litejax.train_step lays
  it out (`state_layout` on an AbstractMesh of `sizes`), so `train.expert_update` and
  `train.expert_optimizer` are honoured: the dense update keeps optax AdamW's two moments in each
  parameter's dtype; the sparse update keeps the dense parameters' optax state plus each expert/router
  table's row state (lazy AdamW: two f32 moments; factored: f32 row and column statistics, O(d + h) per
  expert) and an int32 count per row. Each array's per-device shard is
  `NamedSharding(AbstractMesh(sizes), spec).shard_shape(shape)`, as jit lays it out. ConfigError when a
  mesh axis does not divide an array's dimension.
  """
  import jax
  from jax.sharding import AbstractMesh

  from litejax import sharding
  mesh = AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
  if not train:
    params, total = _sharded_bytes(_param_structs(cfg, mesh))
    return {'params': params, 'optimizer': 0.0, 'state': params, 'state_total_all_chips': total,
            'params_total_all_chips': total}
  from litejax import sparse_train
  from litejax import train_step as ts
  _, abstract, _ = ts.state_layout(cfg, mesh)
  params, params_total = _sharded_bytes(abstract['params'])
  opt, opt_total = _sharded_bytes(abstract['opt'])
  return {'params': params, 'optimizer': opt, 'state': params + opt, 'state_total_all_chips': params_total + opt_total,
          'params_total_all_chips': params_total, 'optimizer_total_all_chips': opt_total,
          'expert_update': sparse_train.update_mode(cfg, mesh), 'expert_optimizer': cfg.train.expert_optimizer}


def _param_structs(cfg, mesh) -> dict:
  """The abstract model's parameters as ShapeDtypeStructs sharded by their logical axes on `mesh`."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from litejax import sharding
  from litejax.model import abstract_model
  out = {}
  state = nnx.state(abstract_model(cfg), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    sds = var.get_value()
    axes = var.get_metadata().get('logical_axes')
    spec = sharding.logical_to_spec(axes, len(sds.shape)) if axes is not None else PartitionSpec()
    out[jax.tree_util.keystr(path)] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=NamedSharding(mesh, spec))
  return out


def _sharded_bytes(tree) -> tuple[float, float]:
  """(bytes of one device's shards, bytes of the whole arrays) of a tree of sharded ShapeDtypeStructs."""
  import jax
  import numpy as np
  per_device = total = 0.0
  for path, sds in jax.tree_util.tree_leaves_with_path(tree):
    nbytes = np.dtype(sds.dtype).itemsize
    try:
      shard = sds.sharding.shard_shape(sds.shape)
    except ValueError as e:   # jax's IndivisibleError
      raise ConfigError(f'{jax.tree_util.keystr(path)} {tuple(sds.shape)}: mesh {dict(sds.sharding.mesh.shape)} '
                        f'does not divide it ({sds.sharding.spec})') from e
    per_device += math.prod(shard) * nbytes
    total += math.prod(sds.shape) * nbytes
  return per_device, total
