"""`export_hf`: a litejax checkpoint (a trained model, or one imported with `import-hf`) as a Hugging Face folder
that `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json, safetensors shards (one tensor per
expert as published checkpoints are, or transformers 5's fused [E, ...] expert tensors) and the tokenizer.

The family is the one the config maps onto (litejax.hf.families.family_for_config: an error naming the first
field that does not map, before anything is written). Parameters are read one checkpoint leaf at a time
(`Checkpointer.read_leaf`; routed experts from the expert store when the checkpoint keeps them there), and one
shard's tensors are in memory at a time.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import numpy as np

from litejax.config import Config
from litejax.hf.families import family_for_config
from litejax.hf.mapping import LAYOUTS, ExpertArray, Family, leaf_dtype
from litejax.hf.weights import HFError, OutTensor, write_shards
from litejax.train import tokenizer as tokenizers

DEFAULT_SHARD_BYTES = 2 << 30


def layer_leaf(cfg: Config, leaf: str) -> tuple[str, int | None]:
  """The checkpoint leaf holding unscanned leaf name `leaf` ('params/blocks/3/attn/w_q'), and its index on
  the stacked 'layers' axis for a scanned model (period p, position j: params/periods/layers/j/..., [p])."""
  mc = cfg.model
  parts = leaf.split('/')
  if not mc.scan_layers or parts[1] != 'blocks':
    return leaf, None
  period, layer = max(mc.moe_every, 1), int(parts[2])
  return '/'.join([parts[0], 'periods', 'layers', str(layer % period)] + parts[3:]), layer // period


class _Leaves:
  """Reads parameters by unscanned leaf name from a checkpoint step, keeping the last stacked leaf (a scanned
  model's) and the last routed-expert array in memory."""

  def __init__(self, ckpt, step: int, cfg: Config, store=None):
    self.ckpt, self.step, self.cfg, self.store = ckpt, step, cfg, store
    self._last: tuple[str, np.ndarray] | None = None

  def _read(self, name: str) -> np.ndarray:
    if self._last is None or self._last[0] != name:
      self._last = (name, self.ckpt.read_leaf(self.step, name))
    return self._last[1]

  def param(self, leaf: str) -> np.ndarray:
    name, index = layer_leaf(self.cfg, leaf)
    x = self._read(name)
    return x if index is None else x[index]

  def expert(self, a: ExpertArray, e: int) -> np.ndarray:
    """Expert e of `a` in litejax's [in, out]."""
    if self.store is not None:
      return self.store.read_experts(a.layer, [e])[a.array][0]
    return self.param(a.leaf)[e]


def export_tensors(cfg: Config, family: Family, leaves: _Leaves, layout: str, dtype: np.dtype) -> list[OutTensor]:
  """Every tensor of the exported folder, in order, each made when it is written."""
  out = []
  shapes = _shapes(cfg)
  name = family.published if layout == 'per-expert' else (lambda n: n)   # fused: transformers 5's own names
  for t in family.tensors(cfg):
    t_dtype = leaf_dtype(t.leaf, dtype)   # state (a selection bias) stays float32
    out.append(OutTensor(name(t.hf), t.hf_shape(shapes[t.leaf]), t_dtype,
                         lambda t=t, t_dtype=t_dtype: t.to_hf(leaves.param(t.leaf)).astype(t_dtype)))
  experts = family.experts(cfg)
  e_total = cfg.moe.experts_total
  if layout == 'per-expert':
    for a in experts:
      _, d_in, d_out = shapes[a.leaf]
      for e in range(e_total):
        out.append(OutTensor(name(a.per_expert.format(e=e)), (d_out, d_in), dtype,
                             lambda a=a, e=e: leaves.expert(a, e).T.astype(dtype)))
    return out
  for fused in dict.fromkeys(a.fused for a in experts):
    mine = sorted((a for a in experts if a.fused == fused), key=lambda a: a.rows or (0, 0))

    def make(mine=mine):
      return np.stack([np.concatenate([leaves.expert(a, e).T for a in mine], axis=0)
                       for e in range(e_total)]).astype(dtype)
    rows = sum(shapes[a.leaf][2] for a in mine)
    out.append(OutTensor(fused, (e_total, rows, shapes[mine[0].leaf][1]), dtype, make))
  return out


def _shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """{unscanned leaf: shape}: the names the family's mapping uses, whatever the checkpoint's layout."""
  from litejax.hf.importer import abstract_state, state_shapes
  return state_shapes(*abstract_state(cfg.replace(model=dataclasses.replace(cfg.model, scan_layers=False))))


def hf_config(cfg: Config, family: Family, source: dict[str, Any] | None) -> dict[str, Any]:
  """config.json: the family's architectural fields from the litejax config, over the informational ones of the
  config.json the model was imported from (special token ids, max_position_embeddings), if any."""
  keep = ('bos_token_id', 'eos_token_id', 'pad_token_id', 'max_position_embeddings', 'initializer_range',
          'router_aux_loss_coef')
  base = {k: v for k, v in (source or {}).items() if k in keep}
  base.setdefault('max_position_embeddings', cfg.model.seq_len)
  return {'architectures': [family.architecture], 'model_type': family.model_type, **base,
          **family.to_hf_config(cfg), 'use_cache': True}


def export_hf(ckpt_dir: str | pathlib.Path, out: str | pathlib.Path, *, family_name: str | None = None,
              layout: str = 'per-expert', dtype: str | None = None, step: int | None = None,
              overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
  """Writes the Hugging Face folder `out` from the litejax checkpoint folder `ckpt_dir` (newest intact step, or
  `step`). Returns the report `litejax export-hf --json` prints."""
  from litejax.inference.session import EXPERT_STORE
  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store.from_checkpoint import open_checkpoint
  from litejax.inference.store.layout import ExpertStoreError, param_dtype
  if layout not in LAYOUTS:
    raise HFError(f'--layout {layout}: one of {", ".join(LAYOUTS)}')
  if dtype is not None and dtype not in ('float32', 'bfloat16'):
    raise HFError(f'--dtype {dtype}: one of float32, bfloat16')
  if shard_bytes <= 0:
    raise HFError(f'--shard-mib: must be > 0, got {shard_bytes} bytes')
  out = pathlib.Path(out).expanduser()
  try:
    ckpt, step, meta, cfg = open_checkpoint(str(ckpt_dir), step)
  except ExpertStoreError as e:
    raise HFError(str(e)) from None
  try:
    family = family_for_config(cfg, family_name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
      is_hf = (out / 'config.json').is_file()
      if not is_hf or not overwrite:
        raise HFError(f'--out {out}: ' + ('already holds a model; pass --overwrite to replace it' if is_hf else
                                           'exists and is not an empty folder or a Hugging Face model folder'))
    store = None
    if meta.get(EXPERT_STORE):
      try:
        store = ExpertStore.open(meta[EXPERT_STORE], cfg)
      except ExpertStoreError as e:
        raise HFError(f'--ckpt-dir {ckpt_dir}: its routed experts are in {meta[EXPERT_STORE]}: {e}') from None
    np_dtype = param_dtype(cfg if dtype is None else cfg.replace(model=dataclasses.replace(cfg.model, param_dtype=dtype)))
    tensors = export_tensors(cfg, family, _Leaves(ckpt, step, cfg, store), layout, np_dtype)
    # ---- everything is checked: write
    if out.exists():
      shutil.rmtree(out)
    out.mkdir(parents=True)
    config = hf_config(cfg, family, meta.get('imported', {}).get('hf_config'))
    config['dtype'] = str(np_dtype)
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    files = write_shards(out, tensors, shard_bytes)
  finally:
    ckpt.close()
  copied = []
  for name in tokenizers.TOKENIZER_FILES:
    src = pathlib.Path(ckpt_dir).expanduser() / tokenizers.TOKENIZER_DIR / name
    if src.is_file():
      shutil.copyfile(src, out / name)
      copied.append(name)
  return {'architecture': family.architecture, 'out': str(out), 'step': step, 'layout': layout,
          'dtype': config['dtype'], 'tensors': len(tensors), 'files': files, 'tokenizer': copied,
          'bytes': sum(t.nbytes for t in tensors)}
