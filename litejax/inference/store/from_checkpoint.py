"""Export a training checkpoint's routed experts into an expert store.

Only the expert arrays are read (the checkpoint reader's single-leaf reads, `Checkpointer.read_leaf`, as
NumPy), never the optimizer state or the rest of the model; the checkpoint's digest is checked first and
without --step a damaged newest checkpoint falls back to the previous intact one, as `generate` does. A
scanned model's leaf holds every period's experts ([P, E, d, h]), so one such leaf is in memory at a time.
"""
from __future__ import annotations

import pathlib
from typing import Any

import tensorstore as ts

from litejax.config import Config, from_dict
from litejax.inference.store import layout
from litejax.inference.store.disk import ExpertStore
from litejax.inference.store.layout import ExpertStoreError
from litejax.inference.store.writer import StoreWriter


def open_checkpoint(ckpt_dir: str, step: int | None):
  """(read-only Checkpointer, step, meta, config) of checkpoint `step` (default: the newest intact one);
  raises ExpertStoreError before anything is created on disk."""
  from litejax.train.checkpoint import Checkpointer, CheckpointCorruptError, CheckpointInFlightError
  if '://' not in ckpt_dir and not pathlib.Path(ckpt_dir).expanduser().is_dir():
    raise ExpertStoreError(f'--ckpt-dir {ckpt_dir}: no such directory')
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  steps = ckpt.all_steps()
  try:
    if not steps or (step is not None and step not in steps):
      want = 'checkpoint' if step is None else f'step {step} (it has {steps})'
      raise ExpertStoreError(f'--ckpt-dir {ckpt_dir}: holds no {want}')
    step, meta = ckpt.newest_meta(step, whole=True)
  except Exception as e:
    ckpt.close()
    if isinstance(e, (CheckpointCorruptError, CheckpointInFlightError)):
      raise ExpertStoreError(f'--ckpt-dir {ckpt_dir}: {e}') from None
    raise
  return ckpt, step, meta, from_dict(meta['config'])


def check_leaves(cfg: Config, leaves: dict[str, Any], where: str) -> None:
  """Every expert leaf the config implies exists in the checkpoint with the expected shape and dtype."""
  e, periods = cfg.moe.experts_total, cfg.model.num_layers // max(cfg.model.moe_every, 1)
  dtype = str(layout.param_dtype(cfg))
  for layer, name, leaf, index in layout.expert_leaves(cfg):
    want = [e, *layout.expert_shapes(cfg)[name]]
    want = want if index is None else [periods, *want]
    got = leaves.get(leaf)
    if got is None:
      raise ExpertStoreError(f'{where}: no leaf {leaf} (layer {layer} {name}) in the checkpoint')
    if list(got['shape']) != want or got['dtype'] != dtype:
      raise ExpertStoreError(f'{where}: {leaf} (layer {layer} {name}) is {got["dtype"]} {tuple(got["shape"])}, '
                             f'expected {dtype} {tuple(want)}')


def write_from_checkpoint(location: str, ckpt_dir: str, step: int | None = None, *, overwrite: bool = False,
                          context: ts.Context | None = None) -> ExpertStore:
  """Writes the routed experts of checkpoint `step` (default: the newest) of `ckpt_dir` to LOCATION."""
  ckpt, step, meta, cfg = open_checkpoint(str(ckpt_dir), step)
  try:
    if not layout.moe_layers(cfg):
      raise ExpertStoreError(f'--ckpt-dir {ckpt_dir}: checkpoint step {step} is of a dense model (model.moe_every='
                             f'{cfg.model.moe_every}): it has no routed experts to export')
    check_leaves(cfg, meta.get('leaves', {}), f'checkpoint {ckpt_dir}/{step}')
    writer = StoreWriter(location, cfg, overwrite=overwrite, context=context)
    try:
      by_leaf: dict[str, list[tuple[int, str, int | None]]] = {}
      for layer, name, leaf, index in layout.expert_leaves(cfg):
        by_leaf.setdefault(leaf, []).append((layer, name, index))
      for leaf, targets in by_leaf.items():
        value = ckpt.read_leaf(step, leaf)
        for layer, name, index in targets:
          writer.write(layer, 0, {name: value if index is None else value[index]})
    except BaseException:
      writer.close()
      raise
  finally:
    ckpt.close()
  # Absolute, so `generate --store` finds the same checkpoint's other weights from any working directory.
  source = {'kind': 'checkpoint', 'ckpt_dir': str(pathlib.Path(ckpt_dir).resolve()), 'step': int(step)}
  skipped = [{'step': s, 'why': why} for s, why in sorted(ckpt.skipped.items(), reverse=True) if s > step]
  return writer.finish({**source, 'skipped': skipped} if skipped else source)
