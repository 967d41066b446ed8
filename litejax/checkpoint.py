"""Checkpoints with Orbax `CheckpointManager`: train state + a JSON sidecar, restored onto any mesh.

A checkpoint `DIR/<step>/` holds two items:
  state  the train-state pytree (params, optimizer state, step, RNG key data), saved by
         `StandardSave` (OCDBT/zarr tensors; no pickle anywhere).
  meta   JSON: step, the next data position, the full config, and every state leaf's shape and dtype.

Restore goes through an *abstract* state whose leaves are `jax.ShapeDtypeStruct`s carrying the
current mesh's shardings, so a checkpoint written on 8 devices is read straight onto 4 or 1. Before
any tensor is read, the saved shapes in `meta` are compared with the abstract state: an incompatible
config fails with `CheckpointMismatchError` naming the first mismatched leaf. A checkpoint that fails
to read (truncated file, missing item) is skipped with a warning and the previous one is tried;
Orbax itself writes each step to a temporary folder and renames it only when complete, so a save cut
off by a kill is never even listed.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree or shapes do not match the state the current config builds."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns."""
  step: int
  state: Any
  meta: dict[str, Any]


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


def check_compatible(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], where: str) -> None:
  """Raises CheckpointMismatchError naming the first leaf that is missing, extra, or reshaped
  (parameters are checked before optimizer state, so the name is the one a user recognises)."""
  for name in sorted(current, key=lambda n: not n.startswith('params/')):
    spec = current[name]
    if name not in saved:
      raise CheckpointMismatchError(
          f'{where}: the current config has {name} {tuple(spec["shape"])} but the checkpoint has no such '
          'array (a different model/optimizer structure; use another --ckpt-dir or drop --resume)')
    if list(saved[name]['shape']) != list(spec['shape']):
      raise CheckpointMismatchError(
          f'{where}: {name} has shape {tuple(saved[name]["shape"])} in the checkpoint but '
          f'{tuple(spec["shape"])} in the current config (incompatible config; use another --ckpt-dir '
          'or the config the checkpoint was written with)')
  extra = sorted(set(saved) - set(current))
  if extra:
    raise CheckpointMismatchError(
        f'{where}: the checkpoint has {extra[0]} {tuple(saved[extra[0]]["shape"])} which the current config '
        f'does not build ({len(extra)} such arrays)')


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run in `directory`; saves asynchronously.

  Every process calls every method (Orbax writes collectively: each process its own shards,
  process 0 the metadata).
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    d = str(directory)
    # Remote stores (gs://, s3://) go to Orbax as URLs; local paths are made absolute.
    self.directory = d if '://' in d else pathlib.Path(d).expanduser().absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        # Leftover temporary folders from a save cut off by a kill are deleted, never read.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def all_steps(self) -> list[int]:
    """Complete checkpoints, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving `state` at `step` (returns once device buffers are copied; writes continue in the
    background). `meta` must be JSON-serialisable; shapes and the format version are added."""
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION, leaves=leaf_specs(state))
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON sidecar of one checkpoint (no tensors read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, abstract_state: Any, step: int | None = None) -> Restored | None:
    """Restores the newest readable checkpoint (or exactly `step`) into `abstract_state`'s shardings.

    Returns None when the directory holds no checkpoint. Raises CheckpointMismatchError when the
    checkpoint was written by an incompatible config; a checkpoint that cannot be read is skipped
    with a warning (only when `step` is None).
    """
    self.manager.reload()
    candidates = [step] if step is not None else list(reversed(self.all_steps()))
    current = leaf_specs(abstract_state)
    for s in candidates:
      where = f'checkpoint {self.directory}/{s}'
      try:
        meta = self.read_meta(s)
      except Exception as e:  # noqa: BLE001 (any read failure means: not a usable checkpoint)
        if step is not None:
          raise
        _skip(where, e)
        continue
      check_compatible(meta.get('leaves', {}), current, where)
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))['state']
      except Exception as e:  # noqa: BLE001
        if step is not None:
          raise
        _skip(where, e)
        continue
      return Restored(step=s, state=restored, meta=meta)
    return None

  def wait(self) -> None:
    """Blocks until in-flight saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _skip(where: str, error: Exception) -> None:
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  msg = f'{where} is unreadable ({type(error).__name__}: {first[:300]}); skipping it and trying an older one'
  warnings.warn(msg, RuntimeWarning, stacklevel=3)
  log.warning(msg)
