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


def state_bytes_per_device(cfg, sizes: dict[str, int], train: bool) -> dict[str, float]:
  """Bytes of parameters (and, training, AdamW's two moments) one device holds under the mesh rules.

  From the abstract model's parameter shapes and logical axes: each parameter's per-device shard is
  `NamedSharding(AbstractMesh(sizes), spec).shard_shape(shape)`, as jit would lay it out. AdamW's mu
  and nu mirror every parameter in its dtype and sharding (litejax.sharding.tree_shardings_like),
  hence 2x the parameter bytes. ConfigError when a mesh axis does not divide a parameter's dimension.
  """
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

  from litejax import sharding
  from litejax.model import abstract_model
  mesh = AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
  params = total = 0.0
  state = nnx.state(abstract_model(cfg), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    sds = var.get_value()
    nbytes = np.dtype(sds.dtype).itemsize
    axes = var.get_metadata().get('logical_axes')
    spec = sharding.logical_to_spec(axes, len(sds.shape)) if axes is not None else PartitionSpec()
    try:
      shard = NamedSharding(mesh, spec).shard_shape(sds.shape)
    except ValueError as e:   # jax's IndivisibleError
      raise ConfigError(f'parameter {jax.tree_util.keystr(path)} {tuple(sds.shape)}: mesh {sizes} does not '
                        f'divide it ({spec})') from e
    params += math.prod(shard) * nbytes
    total += math.prod(sds.shape) * nbytes
  factor = 3 if train else 1
  return {'params': params, 'optimizer': params * (factor - 1), 'state': params * factor,
          'state_total_all_chips': total * factor}
