"""What a checkpoint's arrays are, by name, shape and dtype (the form its sidecar stores them in), and
whether they fit the state the current config builds: the shape check of every checkpoint read."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from litejax.config import InputError


class CheckpointMismatchError(InputError):
  """The checkpoint's tree or shapes do not match the state the current config builds."""


def leaf_specs(tree: Any) -> dict[str, dict[str, Any]]:
  """{'params/blocks/0/attn/w_q': {'shape': [...], 'dtype': 'float32'}, ...} for a (possibly abstract)
  pytree: the form shapes are stored in and compared by."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_str(path)
    # nnx Variables flatten to '<path>/value'; the suffix says nothing to a reader.
    name = name[:-len('/value')] if name.endswith('/value') else name
    out[name] = {'shape': [int(n) for n in np.shape(leaf)], 'dtype': str(np.dtype(leaf.dtype))}
  return out


def path_str(path: tuple[Any, ...]) -> str:
  """A key path as 'a/b/0/c' (dict keys, attributes and sequence indices alike)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def check_compatible(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], where: str,
                     partial: bool = False) -> None:
  """Raises CheckpointMismatchError naming the first leaf that is missing, extra, or reshaped
  (parameters are checked before optimizer state, so the name is the one a user recognises).
  partial: `current` is a part of the saved state (a partial restore): saved leaves beyond it are fine."""
  for name in sorted(current, key=lambda n: not n.startswith('params/')):
    spec = current[name]
    if name not in saved:
      hint = ('another --ckpt-dir, or the config the checkpoint was written with' if partial else
              'another --ckpt-dir or drop --resume')
      raise CheckpointMismatchError(
          f'{where}: the current config has {name} {tuple(spec["shape"])} but the checkpoint has no such '
          f'array (a different model/optimizer structure; use {hint})')
    if list(saved[name]['shape']) != list(spec['shape']):
      raise CheckpointMismatchError(
          f'{where}: {name} has shape {tuple(saved[name]["shape"])} in the checkpoint but '
          f'{tuple(spec["shape"])} in the current config (incompatible config; use another --ckpt-dir '
          'or the config the checkpoint was written with)')
  extra = sorted(set(saved) - set(current))
  if extra and not partial:
    raise CheckpointMismatchError(
        f'{where}: the checkpoint has {extra[0]} {tuple(saved[extra[0]]["shape"])} which the current config '
        f'does not build ({len(extra)} such arrays)')
