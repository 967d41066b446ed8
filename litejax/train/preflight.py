"""Before a training run writes anything: the config it trains and every check that can fail on its input.

`litejax train` calls `run_config`, then `check`, then takes the run folder's lock (litejax.train.run_folder)
and only then deletes or writes; so bad input ends in one InputError line with the folder untouched.
"""
from __future__ import annotations

import pathlib

from litejax.config import Config, InputError, from_dict, load_config, parse_overrides
from litejax.train import run_folder
from litejax.train.run_folder import RunPaths


def run_config(config: str | None, overrides: list[str], ckpt_dir: str | None, resume: bool,
               default: str) -> tuple[Config, str]:
  """(config, where it came from): `config` (a path or shipped name) with `overrides`; else, when resuming
  a folder that holds checkpoints, the config stored with them (so `--resume --ckpt-dir D` alone continues
  D's run); else `default`."""
  from litejax.train.checkpoint import restore_config
  if config is None and ckpt_dir and resume and \
      run_folder.checkpoint_steps(run_folder.make_paths(ckpt_dir, None).local_ckpt):
    stored = restore_config(ckpt_dir)
    if stored is not None:
      return from_dict(parse_overrides(overrides), base=stored), f'{ckpt_dir} (stored config)'
  path = config or default
  return load_config(path, overrides), path


def check(cfg: Config, paths: RunPaths, mode: str, data_path: str | None) -> None:
  """Every check that can fail on the user's input, before anything is written or deleted: the paths, the
  mode against what the folder holds, the mesh, the corpus, and the checkpoint a resume would read."""
  from litejax import sharding as shd
  from litejax.train.data import TokenDataset
  from litejax.train.tokenizer import text_encoder
  run_folder.check_paths(paths)
  steps = run_folder.check_mode(paths, mode)
  mesh = shd.make_mesh(cfg.mesh)
  shd.validate_mesh(cfg, mesh, cfg.train.batch_size)
  try:
    TokenDataset.from_path(data_path, val_fraction=cfg.train.val_fraction, seq_len=cfg.model.seq_len,
                           vocab_size=cfg.model.vocab_size, encode_text=text_encoder(paths.local_ckpt))
  except (OSError, ValueError) as e:
    raise InputError(str(e) if str(e).startswith('--data') else f'--data: {e}') from None
  if steps and mode.startswith('resume'):
    check_checkpoint(cfg, mesh, paths.local_ckpt)


def check_checkpoint(cfg: Config, mesh, ckpt_dir: pathlib.Path) -> None:
  """The newest checkpoint with an intact sidecar must fit the state this config builds
  (CheckpointMismatchError naming the leaf). Read-only: a running writer's folders are left alone. When
  none is intact the restore itself reports it (CheckpointCorruptError)."""
  from litejax.train import step as train_step
  from litejax.train.checkpoint import Checkpointer, CheckpointCorruptError, holds_optimizer_state
  from litejax.train.leaf_specs import check_compatible, leaf_specs
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    found = ckpt.newest_meta()
  except CheckpointCorruptError:
    return
  finally:
    ckpt.close()
  if found is not None:
    step, meta = found
    weights_only = not holds_optimizer_state(meta)   # imported weights: the optimizer starts fresh
    if weights_only:
      abstract = {k: abstract[k] for k in ('params', 'extra', 'step', 'rng')}
    check_compatible(meta.get('leaves', {}), leaf_specs(abstract), f'checkpoint {ckpt_dir}/{step}', partial=weights_only)
