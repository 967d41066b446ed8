"""Typed, frozen configuration loaded from YAML with `--set section.key=value` overrides.

A config has five sections: `model`, `moe`, `mesh`, `train`, `store` (optional: TierSets). Every field is typed; unknown keys,
wrong types and invalid combinations raise `ConfigError` naming the field and the constraint.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import re
import types
from typing import Any, Iterable, Literal, get_args, get_origin

import yaml

from litejax import config_rules
from litejax.config_rules import parse_layer_list


class InputError(ValueError):
  """Bad input from the user (a config, a flag, a data or checkpoint path): the CLI prints the message,
  one line naming the field or path and the constraint, and exits with status 2."""


class ConfigError(InputError):
  """A config field is missing, unknown, mistyped, or violates a constraint."""


# Shipped configs: the repo's top-level configs/ folder, installed as the package data litejax/configs/
# (pyproject.toml maps one onto the other), so `--config tiny` works from any folder.
# An upper bound that only catches absurd values (shapes must fit int32 indexing).
MAX_INT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 64                 # d
  num_layers: int = 2               # L
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0                 # 0 -> d_model // num_heads
  seq_len: int = 64
  vocab_size: int = 256
  tie_embeddings: bool = True
  moe_every: int = 1                # layer i (1-based) is MoE when i % moe_every == 0; 0 = no MoE
  dense_layers: str = ''            # dense although moe_every says MoE: '0,3', a prefix '0-2' (0-based; '' none)
  d_ff: int = 0                     # dense FFN hidden size; 0 -> 4 * d_model
  ffn_kind: Literal['mlp', 'glu'] = 'glu'
  scan_layers: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qk_norm: bool = False             # RMSNorm over head_dim on each query and key head, before RoPE (Qwen3)
  dtype: Literal['float32', 'bfloat16'] = 'float32'        # compute dtype
  param_dtype: Literal['float32', 'bfloat16'] = 'float32'
  # Attention: grouped-query (gqa) or DeepSeek's Multi-head Latent Attention (mla, litejax.model.mla),
  # whose sizes are the five fields below (0 where unused); mla ignores num_kv_heads and head_dim.
  attention: Literal['gqa', 'mla'] = 'gqa'
  q_lora_rank: int = 0              # mla: rank of q's low-rank projection; 0 = one full q projection
  kv_lora_rank: int = 0             # mla: width of the compressed key/value latent (what the cache holds)
  qk_nope_head_dim: int = 0         # mla: per-head query/key width without RoPE
  qk_rope_head_dim: int = 0         # mla: per-head query width with RoPE (the key's RoPE part is shared)
  v_head_dim: int = 0               # mla: per-head value width
  # RoPE scaling: none, or YaRN (arXiv 2309.00071, as transformers' `rope_type: yarn` computes it):
  # frequencies interpolated by rope_factor outside the [beta_slow, beta_fast] rotation band of
  # rope_original_max_len positions, cos/sin scaled by the attention factor from the two mscales
  # (0 = unset), and mla's softmax scale by mscale(rope_factor, rope_mscale_all_dim)^2.
  rope_scaling: Literal['none', 'yarn'] = 'none'
  rope_factor: float = 1.0
  rope_original_max_len: int = 0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 0.0
  rope_mscale_all_dim: float = 0.0

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def resolved_d_ff(self) -> int:
    return self.d_ff or 4 * self.d_model

  def is_moe_layer(self, layer: int) -> bool:
    """Whether 0-based `layer` holds an MoE block: every `moe_every`-th layer from 1, except `dense_layers`."""
    return self.moe_every > 0 and (layer + 1) % self.moe_every == 0 and layer not in parse_layer_list(self.dense_layers)

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_tiers: int = 1                # T
  groups_per_tier: int = 1          # G
  experts_per_group: int = 8        # E_g
  k_tier: int = 1
  k_group: int = 1
  k_expert: int = 2
  d_expert: int = 128               # h
  capacity_factor: float = 1.25
  # Capacity factor of prefill (evaluation without gradients); null: prefill is dropless, as decode
  # always is (litejax.inference.decode), so a prompt's logits do not depend on what else is in the batch.
  eval_capacity_factor: float | None = None
  min_capacity: int = 1
  expert_kind: Literal['mlp', 'glu'] = 'mlp'
  num_shared_experts: int = 0
  d_shared: int = 0                 # shared expert hidden; 0 -> d_expert
  score: Literal['softmax', 'sigmoid'] = 'softmax'
  renormalize: bool = True          # combine weights sum to 1 over the K assignments
  dispatch: Literal['auto', 'capacity', 'gather', 'einsum', 'dropless'] = 'auto'
  # `auto` switches from the capacity buffer to gather once E >= auto_gather_ratio * N*K: most
  # experts then get no token, and gathering the used experts' weights moves less than the buffer
  # path's read of every expert (plus its padding rows).
  auto_gather_ratio: float = 2.0
  bias_update_rate: float = 0.0     # loss-free balancing step for sigmoid selection bias (0 = off)
  aux_loss_weight: float = 0.01     # Switch load-balance loss, summed over levels
  z_loss_weight: float = 0.001      # ST-MoE router z-loss
  rank_aligned_groups: bool = False  # send a token once per chosen group (rank) in expert parallel
  # The last level: k_expert experts in each kept group (per_group), or k_expert experts of each kept
  # tier pooled over its kept groups' experts (pooled: DeepSeek-V3's group-limited routing).
  expert_selection: Literal['per_group', 'pooled'] = 'per_group'
  # How groups are scored: by their own router table (router_group), or, as DeepSeek-V3, by the sum of
  # their two best expert selection scores (top2_experts: every expert of every candidate group is
  # scored first; no router_group table).
  group_score: Literal['router', 'top2_experts'] = 'router'
  routed_scale: float = 1.0         # routed experts' combine weights scaled by this (routed_scaling_factor)
  # Pre-gated routing (Hwang et al., ISCA 2024; litejax.model.transformer): MoE layer l routes the router
  # input of MoE layer l - pregate (the first `pregate` their own), so its experts are known early. 0 = off.
  pregate: int = 0

  @property
  def experts_total(self) -> int:
    """Experts per MoE layer: T * G * E_g."""
    return self.num_tiers * self.groups_per_tier * self.experts_per_group

  @property
  def k_active(self) -> int:
    """K = k_tier * k_group * k_expert (per_group), k_tier * k_expert (pooled)."""
    if self.expert_selection == 'pooled':
      return self.k_tier * self.k_expert
    return self.k_tier * self.k_group * self.k_expert

  @property
  def router_expert_visits(self) -> int:
    """(token, group) rows the expert level scores per token: the kept groups, k_tier·k_group; with
    group_score top2_experts every group of the kept tiers, k_tier·G."""
    if self.group_score == 'top2_experts':
      return self.k_tier * self.groups_per_tier
    return self.k_tier * self.k_group

  @property
  def resolved_d_shared(self) -> int:
    return self.d_shared or self.d_expert


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1                    # -1: whatever devices remain
  expert: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  batch_size: int = 16
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 20
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  ckpt_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 50
  eval_batches: int = 4
  log_every: int = 10
  val_fraction: float = 0.05
  # How expert (and gathered router) tables are updated: `dense` differentiates and AdamW-updates every
  # row; `sparse` only the rows a step touches (litejax.train.sparse_step); `auto` is dense while every expert
  # is touched anyway (E <= N·K), sparse beyond (`resolve_expert_update`).
  expert_update: Literal['auto', 'dense', 'sparse'] = 'auto'
  # The row optimizer of the sparse path: lazy AdamW, or Adafactor-style factored (O(d + h) per expert).
  expert_optimizer: Literal['adamw', 'factored'] = 'adamw'


STORAGE_CLASSES = ('hot', 'warm', 'cold')


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  # TierSets (issue 13): the storage class of each routing tier, comma-separated, one per moe.num_tiers
  # ("hot,warm,cold,cold"): hot tiers' experts are meant to stay in device slots, warm ones in the host
  # cache, cold ones on disk. '' = every tier hot.
  placement: str = ''

  def classes(self, num_tiers: int) -> tuple[str, ...]:
    """The storage class of each routing tier."""
    return tuple(c.strip() for c in self.placement.split(',')) if self.placement else ('hot',) * num_tiers


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  moe: MoEConfig = MoEConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()
  store: StoreConfig = StoreConfig()

  def replace(self, **sections: Any) -> 'Config':
    return dataclasses.replace(self, **sections)

  def to_dict(self) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(self)


_SECTION_TYPES = {'model': ModelConfig, 'moe': MoEConfig, 'mesh': MeshConfig, 'train': TrainConfig, 'store': StoreConfig}


def _coerce(section: str, field: dataclasses.Field, value: Any) -> Any:
  name = f'{section}.{field.name}'
  ftype = eval(field.type) if isinstance(field.type, str) else field.type  # noqa: S307 (own annotations)
  if get_origin(ftype) is Literal:
    if value not in get_args(ftype):
      raise ConfigError(f'{name}: must be one of {list(get_args(ftype))}, got {value!r}')
    return value
  if isinstance(ftype, types.UnionType) and type(None) in get_args(ftype):   # `float | None`: null allowed
    if value is None:
      return None
    inner = copy.copy(field)
    (inner.type,) = [a for a in get_args(ftype) if a is not type(None)]
    return _coerce(section, inner, value)
  if ftype is bool and not isinstance(value, bool):
    raise ConfigError(f'{name}: must be a bool (true/false), got {value!r}')
  if ftype is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if not (isinstance(value, float) and value.is_integer()):
        raise ConfigError(f'{name}: must be an integer, got {value!r}')
      value = int(value)
    if abs(value) > MAX_INT:
      raise ConfigError(f'{name}: must be at most {MAX_INT} in magnitude, got {value}')
    return value
  if ftype is str and not isinstance(value, str):
    raise ConfigError(f'{name}: must be a string, got {value!r}')
  if ftype in (bool, str):
    return value
  if ftype is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{name}: must be a number, got {value!r}')
    if not math.isfinite(value):
      raise ConfigError(f'{name}: must be finite, got {value!r}')
    return float(value)
  raise AssertionError(f'unhandled type {ftype} for {name}')


def from_dict(raw: dict[str, Any] | None, base: Config | None = None) -> Config:
  """Builds a validated Config from nested dicts, on top of `base` (defaults if None)."""
  base, raw = base or Config(), raw or {}
  if not isinstance(raw, dict):
    raise ConfigError(f'config: top level must be a mapping of sections, got {type(raw).__name__} {_short(raw)}')
  sections = {}
  for sname, svalue in raw.items():
    if not isinstance(sname, str) or sname not in _SECTION_TYPES:
      raise ConfigError(f'{sname if isinstance(sname, str) else _short(sname)}: unknown section (known: {sorted(_SECTION_TYPES)})')
    if svalue is None:
      continue
    if not isinstance(svalue, dict):
      raise ConfigError(f'{sname}: must be a mapping of keys, got {_short(svalue)}')
    fields = {f.name: f for f in dataclasses.fields(_SECTION_TYPES[sname])}
    updates = {}
    for key, value in svalue.items():
      if not isinstance(key, str) or key not in fields:
        raise ConfigError(f'{sname}.{key}: unknown key (known: {sorted(fields)})')
      updates[key] = _coerce(sname, fields[key], value)
    sections[sname] = dataclasses.replace(getattr(base, sname), **updates)
  cfg = dataclasses.replace(base, **sections)
  validate(cfg)
  return cfg


class _Loader(yaml.SafeLoader):
  """The safe loader, also reading exponent floats without a dot (1e-3) as floats (YAML 1.1's need a '.')."""


_Loader.add_implicit_resolver('tag:yaml.org,2002:float', re.compile(r'^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$'),
                              list('-+0123456789.'))


def parse_overrides(overrides: Iterable[str]) -> dict[str, dict[str, Any]]:
  """Parses `section.key=value` strings (values read as YAML scalars) into nested dicts."""
  out: dict[str, dict[str, Any]] = {}
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f'--set {item!r}: expected section.key=value')
    path, text = item.split('=', 1)
    parts = path.strip().split('.')
    if len(parts) != 2 or not all(parts):
      raise ConfigError(f'--set {item!r}: key must look like section.key (e.g. moe.k_expert=2)')
    try:
      value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as e:
      raise ConfigError(f'--set {path}: cannot parse value {text!r}: {" ".join(str(e).split())}') from None
    out.setdefault(parts[0], {})[parts[1]] = value
  return out


def _short(value: Any, limit: int = 60) -> str:
  text = ' '.join(repr(value).split())
  return text if len(text) <= limit else text[:limit] + '...'


def shipped_configs() -> dict[str, pathlib.Path]:
  """{'tiny': path, ...}: the shipped configs (litejax/configs/ in a wheel; the repo's configs/ in a source tree)."""
  here = pathlib.Path(__file__).resolve().parent
  root = here / 'configs' if (here / 'configs').is_dir() else here.parent / 'configs'
  return {p.stem: p for p in sorted(root.glob('*.yaml'))}


def resolve_config_path(path: str | pathlib.Path) -> pathlib.Path:
  """A config path as given if it exists, else the shipped config of that name ('tiny' or 'tiny.yaml')."""
  p = pathlib.Path(path).expanduser()
  return p if p.exists() or len(p.parts) != 1 else shipped_configs().get(p.name.removesuffix('.yaml'), p)


def _read_yaml(p: pathlib.Path) -> Any:
  if not p.is_file():
    raise ConfigError(f'config file {str(p)!r} does not exist (or is not a file); shipped: {", ".join(shipped_configs())}')
  try:
    text = p.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(f'{p}: not a UTF-8 text file (byte {e.start}: {e.reason})') from None
  except OSError as e:
    raise ConfigError(f'{p}: cannot read: {e.strerror}') from None
  try:
    return yaml.load(text, Loader=_Loader)
  except yaml.YAMLError as e:
    raise ConfigError(f'{p}: not valid YAML: {" ".join(str(e).split())}') from None


def load_config(path: str | pathlib.Path | None = None, overrides: Iterable[str] = ()) -> Config:
  """Loads a YAML config file (safe loader; a bare name like 'tiny' finds the shipped one) and applies
  `--set` overrides, then validates."""
  cfg = from_dict(_read_yaml(resolve_config_path(path)) if path is not None else None)
  ov = parse_overrides(overrides)
  return from_dict(ov, base=cfg) if ov else cfg


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _validate_store(cfg: Config) -> None:
  if not cfg.store.placement:
    return
  classes = cfg.store.classes(cfg.moe.num_tiers)
  _require(len(classes) == cfg.moe.num_tiers, f'store.placement: needs one class per routing tier '
           f'(moe.num_tiers={cfg.moe.num_tiers}), got {len(classes)} in {cfg.store.placement!r}')
  bad = [c for c in classes if c not in STORAGE_CLASSES]
  if bad:
    raise ConfigError(f'store.placement: classes must be among {list(STORAGE_CLASSES)}, got {bad[0]!r}')
  hot = classes.count('hot')
  _require(hot >= cfg.moe.k_tier, f'store.placement: needs at least moe.k_tier={cfg.moe.k_tier} hot tiers (the '
           f'smallest TierSet), got {hot} in {cfg.store.placement!r}')


def validate(cfg: Config) -> None:
  """Raises ConfigError for the first violated constraint (the store's here, the rest litejax.config_rules')."""
  _validate_store(cfg)
  try:
    config_rules.check(cfg)
  except config_rules.Violation as e:
    raise ConfigError(str(e)) from None
