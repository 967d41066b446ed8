"""`import_hf`: a Hugging Face folder (config.json, safetensors, tokenizer.json) into a litejax checkpoint folder,
the routed experts optionally straight into an expert store.

Everything that can fail is checked first, from config.json and the safetensors headers alone: the architecture
and each config field (litejax.hf.families), every tensor's place and shape and every litejax parameter's source
(litejax.hf.mapping.plan_import), the tokenizer, the destinations. Only then is anything deleted or written.

Tensors are read one at a time (litejax.hf.weights). With a store, each expert is read and written on its own
(the next expert is read while the previous one is written), so an import holds the non-expert weights, which
the checkpoint is written from in one save, and a few experts; without one the whole model is in memory once.

The checkpoint is step 0 of a run: params, extra, step and the key of `train.seed`, no optimizer state (a
`train --resume` starts a fresh optimizer, litejax.train.loop), and in its sidecar the config, the source and,
with a store, the store's location (litejax.inference.session.EXPERT_STORE). The tokenizer files are copied to
CKPT_DIR/tokenizer/ (litejax.train.tokenizer).
"""
from __future__ import annotations

import pathlib
import shutil
import time
from typing import Any, Callable

import numpy as np

from litejax.config import Config
from litejax.hf.config_fields import ConfigFields, read_config_json
from litejax.hf.families import family_for_hf
from litejax.hf.mapping import ExpertArray, leaf_dtype, plan_import
from litejax.hf.weights import HFError, WeightIndex
from litejax.train import tokenizer as tokenizers

DTYPES = ('float32', 'bfloat16')


def default_dtype(raw: dict[str, Any]) -> str:
  """The dtype config.json says its weights are in, where litejax has it; float32 otherwise (float16 converts
  exactly to it)."""
  named = raw.get('dtype') or raw.get('torch_dtype')
  return named if named in DTYPES else 'float32'


def check_destination(out: pathlib.Path, hf_dir: pathlib.Path, overwrite: bool) -> None:
  """CKPT_DIR must be new, empty, or (with --overwrite) a checkpoint folder; never the source or around it."""
  from litejax.train import run_folder
  src, dst = hf_dir.resolve(), out.resolve()
  if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
    raise HFError(f'--out {out}: must not be the Hugging Face folder {hf_dir}, inside it, or around it')
  run_folder.check_paths(run_folder.RunPaths(out, None))
  if not out.exists() or not any(out.iterdir()):
    return
  litejax_folder = run_folder.checkpoint_steps(out) or (out / tokenizers.TOKENIZER_DIR).is_dir()
  if not litejax_folder:
    raise HFError(f'--out {out}: is not empty and holds no litejax checkpoint; refusing to write into it')
  if not overwrite:
    raise HFError(f'--out {out}: already holds a checkpoint; pass --overwrite to replace it')


def _tokenizer_files(hf_dir: pathlib.Path, cfg: Config, wanted: bool) -> list[pathlib.Path]:
  if not wanted:
    return []
  path = hf_dir / tokenizers.TOKENIZER_FILE
  if not path.is_file():
    raise HFError(f'{hf_dir}: no {tokenizers.TOKENIZER_FILE} (the fast tokenizer generate and eval read); '
                  'pass --no-tokenizer to import the weights alone (text is then byte-level)')
  tok = tokenizers.HFTokenizer(path)
  if tok.vocab_size > cfg.model.vocab_size:
    raise HFError(f'{path}: {tok.vocab_size} tokens, more than config.json vocab_size {cfg.model.vocab_size}')
  return [hf_dir / n for n in tokenizers.TOKENIZER_FILES if (hf_dir / n).is_file()]


def prepare(hf_dir: str | pathlib.Path, dtype: str | None = None, seq_len: int | None = None):
  """(config.json, family, litejax config, weight index, plan): everything an import checks before writing."""
  hf_dir = pathlib.Path(hf_dir).expanduser()
  raw = read_config_json(hf_dir)
  family = family_for_hf(raw)
  dtype = dtype or default_dtype(raw)
  if dtype not in DTYPES:
    raise HFError(f'--dtype {dtype}: one of {", ".join(DTYPES)}')
  cfg = family.to_config(ConfigFields(raw), dtype, seq_len)
  index = WeightIndex.open(hf_dir, family.canonical)
  mc = cfg.model
  if not mc.tie_embeddings and 'lm_head.weight' not in index:
    raise HFError('config.json: tie_word_embeddings: false, but the checkpoint has no lm_head.weight')
  if mc.tie_embeddings and 'lm_head.weight' in index:
    tied = index.read('lm_head.weight')
    if not np.array_equal(tied, index.read('model.embed_tokens.weight')):
      raise HFError('config.json: tie_word_embeddings: true, but lm_head.weight differs from '
                    'model.embed_tokens.weight')
    del index.tensors['lm_head.weight']   # the tied copy of the embedding: nothing to convert
  params, extra = abstract_state(cfg)
  prefixes, _ = family.not_modelled(raw)
  plan = plan_import(cfg, family, index, state_shapes(params, extra), prefixes)
  return raw, family, cfg, index, plan, (params, extra)


def abstract_state(cfg: Config):
  """(params, extra) of `cfg`'s model as nnx States of ShapeDtypeStructs (nothing allocated)."""
  from flax import nnx

  from litejax.model.transformer import abstract_model
  return nnx.split(abstract_model(cfg), nnx.Param, ...)[1:]


def state_shapes(params, extra) -> dict[str, tuple[int, ...]]:
  """{checkpoint leaf: shape} of every parameter ('params/...') and other state ('extra/...', e.g. the
  router's selection biases) of an abstract model."""
  from litejax.train.leaf_specs import leaf_specs
  return {k: tuple(v['shape']) for k, v in leaf_specs({'params': params, 'extra': extra}).items()}


class _ExpertReader:
  """Reads expert e of one MoE layer's arrays, each fused tensor's [e] once for the arrays sharing it."""

  def __init__(self, index: WeightIndex, arrays: list[ExpertArray], layout: str, dtype: np.dtype):
    self.index, self.arrays, self.layout, self.dtype = index, arrays, layout, dtype

  def expert(self, e: int) -> dict[str, np.ndarray]:
    fused: dict[str, np.ndarray] = {}
    out = {}
    for a in self.arrays:
      if self.layout == 'fused':
        if a.fused not in fused:
          fused[a.fused] = self.index.read(a.fused, e)
        matrix = fused[a.fused]
      else:
        matrix = self.index.read(a.per_expert.format(e=e))
      out[a.array] = np.ascontiguousarray(a.from_matrix(matrix, self.layout == 'fused').astype(self.dtype))
    return out


def import_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path, *, store: str | None = None,
              dtype: str | None = None, seq_len: int | None = None, overwrite: bool = False,
              tokenizer: bool = True, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Converts the Hugging Face folder `hf_dir` into the litejax checkpoint folder `out` (routed experts into the
  expert store `store` when given). progress(done, total) after each tensor and expert. Returns the report
  `litejax import-hf --json` prints."""
  import tensorstore as ts

  from litejax.inference.session import EXPERT_STORE
  from litejax.inference.store import layout, writer
  t0 = time.time()
  hf_dir, out = pathlib.Path(hf_dir).expanduser(), pathlib.Path(out).expanduser()
  raw, family, cfg, index, plan, (params, extra) = prepare(hf_dir, dtype, seq_len)
  tok_files = _tokenizer_files(hf_dir, cfg, tokenizer)
  check_destination(out, hf_dir, overwrite)
  context = ts.Context()
  if store is not None:
    try:
      writer.check_destination(store, overwrite, context)
    except layout.ExpertStoreError as e:
      raise HFError(f'--store {store}: {str(e).split(": ", 1)[-1]}') from None
  # ---- everything is checked: write
  if out.exists() and overwrite:
    shutil.rmtree(out)
  counter = _Counter(len(plan.tensors) + len(plan.layouts) * cfg.moe.experts_total, progress)
  shapes, np_dtype = state_shapes(params, extra), layout.param_dtype(cfg)
  values = {t.leaf: counter.add(t.to_litejax(index.read(t.hf), shapes[t.leaf]).astype(leaf_dtype(t.leaf, np_dtype),
                                                                                       copy=False))
            for t in plan.tensors}
  values.update({leaf: np.zeros(shapes[leaf], leaf_dtype(leaf, np_dtype)) for leaf in plan.zeros})
  experts_writer = writer.StoreWriter(store, cfg, overwrite=overwrite, context=context) if store else None
  for layer in sorted(plan.layouts):
    values.update(_convert_layer(index, plan, layer, shapes, np_dtype, experts_writer, counter))
  source = {'architecture': family.architecture, 'hf_dir': str(hf_dir.resolve()),
            'layouts': sorted(set(plan.layouts.values())), 'dtype': cfg.model.param_dtype, 'skipped': plan.skipped,
            'not_modelled': not_modelled_report(family, raw, plan), 'hf_config': raw}
  meta = {'config': cfg.to_dict(), 'data': {'seed': cfg.train.seed, 'next_batch': 0}, 'imported': source}
  if store:
    meta[EXPERT_STORE] = store if '://' in store else str(pathlib.Path(store).expanduser().resolve())
  _save(out, cfg, params, extra, values, meta)
  if tok_files:
    (out / tokenizers.TOKENIZER_DIR).mkdir()
    for f in tok_files:
      shutil.copyfile(f, out / tokenizers.TOKENIZER_DIR / f.name)
  if experts_writer:
    experts_writer.finish({'kind': 'checkpoint', 'ckpt_dir': str(out.resolve()), 'step': 0,
                           'hf_dir': str(hf_dir.resolve())})
  seconds = time.time() - t0
  return {'architecture': family.architecture, 'out': str(out), 'store': store, 'dtype': cfg.model.param_dtype,
          'layouts': source['layouts'], 'tensors': len(plan.tensors), 'moe_layers': len(plan.layouts),
          'experts': len(plan.layouts) * cfg.moe.experts_total, 'skipped': plan.skipped,
          'not_modelled': source['not_modelled'],
          'tokenizer': bool(tok_files), 'bytes_read': counter.bytes, 'checkpoint_bytes': index.nbytes,
          'seconds': round(seconds, 3), 'gb_per_s': round(counter.bytes / max(seconds, 1e-9) / 1e9, 3)}


def not_modelled_report(family, raw: dict, plan) -> dict[str, Any] | None:
  """What of the checkpoint was not imported because litejax does not model it (None: nothing): why, and the
  tensors skipped."""
  prefixes, why = family.not_modelled(raw)
  if not prefixes:
    return None
  return {'why': why, 'prefixes': list(prefixes), 'tensors': len(plan.not_modelled),
          'names': plan.not_modelled}


class _Counter:
  """Tensors and experts converted, and their bytes, reported to `progress`."""

  def __init__(self, total: int, progress: Callable[[int, int], None] | None):
    self.total, self.progress, self.done, self.bytes = total, progress, 0, 0

  def add(self, x: Any) -> Any:
    self.bytes += sum(a.nbytes for a in x.values()) if isinstance(x, dict) else x.nbytes
    self.done += 1
    if self.progress:
      self.progress(self.done, self.total)
    return x


def _convert_layer(index: WeightIndex, plan, layer: int, shapes, np_dtype, experts_writer,
                   counter: _Counter) -> dict[str, np.ndarray]:
  """One MoE layer's experts, expert by expert: into the store (the next one read while the previous one is
  written; returns {}), or into whole [E, ...] arrays (returned by leaf)."""
  arrays = [a for a in plan.experts if a.layer == layer]
  reader = _ExpertReader(index, arrays, plan.layouts[layer], np_dtype)
  whole = None if experts_writer else {a.array: np.empty(shapes[a.leaf], np_dtype) for a in arrays}
  pending: list = []
  for e in range(shapes[arrays[0].leaf][0]):
    block = counter.add(reader.expert(e))
    if experts_writer:
      for f in pending:
        f.result()
      pending = experts_writer.write_async(layer, e, {k: v[None] for k, v in block.items()})
    else:
      for k, v in block.items():
        whole[k][e] = v
  for f in pending:
    f.result()
  return {} if whole is None else {a.leaf: whole[a.array] for a in arrays}


def _save(out: pathlib.Path, cfg: Config, params, extra, values: dict[str, np.ndarray], meta: dict) -> None:
  """Step 0 of a run without optimizer state (litejax.train.checkpoint.holds_optimizer_state), through the
  checkpoint writer; each host array goes into a device buffer and is dropped, one at a time."""
  import jax
  from flax import nnx

  from litejax.train.checkpoint import Checkpointer
  from litejax.train.step import initial_rng

  def filled(kind: str, state):
    flat = [(p, v.replace(jax.device_put(values.pop(_leaf(kind, p))))) for p, v in nnx.to_flat_state(state)
            if _leaf(kind, p) in values]
    return nnx.from_flat_state(flat)
  state = {'params': filled('params', params), 'extra': filled('extra', extra),
           'step': jax.numpy.zeros((), jax.numpy.int32), 'rng': initial_rng(cfg.train.seed)}
  ckpt = Checkpointer(out, keep=1, async_save=False)
  try:
    ckpt.save(0, state, meta)
  finally:
    ckpt.close()


def _leaf(kind: str, path: tuple) -> str:
  return kind + '/' + '/'.join(map(str, path))
