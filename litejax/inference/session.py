"""A checkpoint loaded for decoding: config from the checkpoint, parameters onto the current mesh, and
`generate` with a runtime sized to the prompts (litejax.inference.decode) and the latency model's split;
and the model that decodes with an expert store's routed experts (`load_store_model`).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, NamedTuple

import jax

from litejax.inference import decode
from litejax import sharding as shd
from litejax.config import Config, from_dict, parse_overrides
from litejax.inference.sampling import Sampling

# A checkpoint sidecar's key naming the expert store that holds its routed experts, where the checkpoint holds
# none of them (`litejax import-hf --store`); absent for training checkpoints.
EXPERT_STORE = 'expert_store'


@dataclasses.dataclass
class Session:
  cfg: Config
  mesh: Any
  params: Any
  extra: Any
  step: int
  runtime: decode.Runtime | None = None
  skipped: tuple[tuple[int, str], ...] = ()   # newer checkpoints passed over (damaged, or a save in flight)

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0) -> decode.Generation:
    """Generates for a batch of token prompts (the runtime is built, or rebuilt, for their batch and length)."""
    s = shd.mesh_sizes(self.mesh)
    ranks = s['data'] * s['expert']
    batch = math.ceil(len(prompts) / ranks) * ranks
    max_len = max(len(p) for p in prompts) + max_new_tokens
    rt = self.runtime
    if rt is None or rt.batch != batch or rt.max_len != max_len:
      rt = self.runtime = decode.make_runtime(self.cfg, self.mesh, batch, max_len)
    with jax.set_mesh(self.mesh):
      return decode.generate(rt, self.params, self.extra, prompts, max_new_tokens, sampling, seed)


def load(ckpt_dir: str | pathlib.Path, overrides: list[str] = (), devices=None, *, experts: bool = True) -> Session:
  """Reads the config stored with the newest checkpoint (plus `overrides`, e.g. mesh.*) and restores
  its parameters onto that config's mesh over `devices` (default all): params and extra alone, by the
  checkpoint reader's partial restore (the optimizer state is never read), from the newest intact
  checkpoint (the steps it passed over, and why, in `Session.skipped`); without `experts`, the params less
  the routed experts (an expert store holds them). Read-only: a damaged step is skipped, never moved (only
  the run's writer does that, litejax.train.run_folder). FileNotFoundError when ckpt_dir holds no
  checkpoint, or its experts live in a store and `experts` is set."""
  from flax import nnx

  from litejax.inference.store.layout import expert_leaves
  from litejax.train import step as train_step
  from litejax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    found = ckpt.newest_meta()
    if found is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: run `litejax train` first (or pass --ckpt-dir)')
    if experts and found[1].get(EXPERT_STORE):
      raise FileNotFoundError(f'--ckpt-dir {ckpt_dir}: holds no routed experts; they are in the expert store '
                              f'{found[1][EXPERT_STORE]} (imported with --store): decode with --store {found[1][EXPERT_STORE]}')
    stored = from_dict(found[1]['config'])
    cfg = from_dict(parse_overrides(overrides), base=stored) if overrides else stored
    mesh = shd.make_mesh(cfg.mesh, devices)
    _, abstract, _ = train_step.state_layout(cfg, mesh)
    params = abstract['params']
    if not experts:
      routed = {leaf for _, _, leaf, _ in expert_leaves(cfg)}
      params = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params)
                                    if 'params/' + '/'.join(map(str, p)) not in routed])
    restored = ckpt.restore({'params': params, 'extra': abstract['extra']}, partial=True)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no readable checkpoint in {ckpt_dir}: run `litejax train` first')
  return Session(cfg, mesh, restored.state['params'], restored.state['extra'], restored.step,
                 skipped=restored.skipped)


class StoreModel(NamedTuple):
  """What decoding from an expert store needs (`load_store_model`)."""
  cfg: Config
  model: Any             # the Transformer: concrete non-expert weights, routed experts abstract or from a checkpoint
  store: Any             # the opened ExpertStore
  weights: str           # where the non-expert weights came from, for the report
  skipped: tuple[tuple[int, str], ...] = ()   # newer checkpoints passed over for those weights


def load_store_model(store_location: str, ckpt_dir: str | pathlib.Path | None = None,
                     overrides: list[str] = ()) -> StoreModel:
  """The model to decode with the routed experts of the store at `store_location`. Its other weights
  come from `ckpt_dir`, else from the checkpoint the store was exported from (its manifest names it),
  else (a store written by `export-experts --init`) they are initialised from the store's config and seed.
  A store exported from a checkpoint never decodes with initialised weights: FileNotFoundError when
  that checkpoint is gone, ValueError when `ckpt_dir` restores another step than the store's experts'."""
  from flax import nnx

  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store_decode import model_without_experts
  from litejax.model.transformer import abstract_model
  source = ExpertStore.read_source(store_location)
  ckpt = pathlib.Path(ckpt_dir) if ckpt_dir else None
  if ckpt is None and source.get('kind') == 'checkpoint':
    ckpt = pathlib.Path(source['ckpt_dir'])
    if not ckpt.is_dir():
      raise FileNotFoundError(f"--store {store_location}: its experts come from checkpoint {ckpt} (step "
                              f"{source.get('step')}), which is not there: pass --ckpt-dir with that checkpoint")
  if ckpt is not None and ckpt.is_dir():
    session = load(ckpt, overrides, jax.devices()[:1], experts=False)   # the store has the routed experts
    if source.get('kind') == 'checkpoint' and 'step' in source and int(source['step']) != session.step:
      raise ValueError(f"--store {store_location} holds the experts of step {source['step']} but --ckpt-dir "
                       f"{ckpt} restored step {session.step}: re-export with `litejax export-experts --ckpt-dir "
                       f"{ckpt} --out STORE`, or pass the checkpoint the store came from")
    store = ExpertStore.open(store_location, session.cfg)
    model = abstract_model(session.cfg)   # routed experts stay abstract
    values = dict(nnx.to_flat_state(jax.device_get(nnx.merge_state(session.params, session.extra))))
    for path, var in nnx.to_flat_state(nnx.state(model)):
      if path in values:
        var.set_value(values[path][...])
    return StoreModel(session.cfg, model, store, f'checkpoint {ckpt}', session.skipped)
  if ckpt is not None:
    raise FileNotFoundError(f'--ckpt-dir {ckpt}: no such checkpoint folder')
  store = ExpertStore.open(store_location)
  cfg = from_dict(store.manifest['config'])
  if overrides:
    cfg = from_dict(parse_overrides(overrides), base=cfg)
  seed = int(store.manifest.get('source', {}).get('seed', 0))
  return StoreModel(cfg, model_without_experts(cfg, seed), store, f'initialised (seed {seed}): the store has no checkpoint')
