"""Reading a Hugging Face `config.json` so that no field is dropped silently: each field is taken once by the
family's mapping (or named as one that does not change the forward pass); `finish` stops on any other field,
naming it. Every error is an HFError naming `config.json: <field>`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from litejax.hf.weights import HFError

CONFIG_FILE = 'config.json'
_REQUIRED = object()

# Fields of every transformers config that do not change what the model computes (ids of special tokens,
# generation and output switches, bookkeeping, the training-only load-balance coefficient, the dtype the
# weights are stored in, which the import reads from the tensors themselves).
INFORMATIONAL = ('_name_or_path', 'transformers_version', 'torch_dtype', 'dtype', 'use_cache', 'bos_token_id',
                 'eos_token_id', 'pad_token_id', 'initializer_range', 'output_router_logits', 'router_aux_loss_coef',
                 'return_dict', 'output_hidden_states', 'output_attentions', 'tokenizer_class', 'max_position_embeddings')


def read_config_json(folder: str | pathlib.Path) -> dict[str, Any]:
  """config.json of a Hugging Face folder as a dict (HFError naming the file when absent or unreadable)."""
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise HFError(f'{folder}: no such folder (expected a Hugging Face model folder with {CONFIG_FILE})')
  path = folder / CONFIG_FILE
  try:
    raw = json.loads(path.read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise HFError(f'{path}: missing (a Hugging Face model folder holds {CONFIG_FILE} and its safetensors)') from None
  except (OSError, ValueError) as e:
    raise HFError(f'{path}: not readable JSON ({e})') from None
  if not isinstance(raw, dict):
    raise HFError(f'{path}: must hold a JSON object, got {type(raw).__name__}')
  return raw


class ConfigFields:
  """The fields of one config.json as the family's mapping takes them."""

  def __init__(self, raw: dict[str, Any], where: str = CONFIG_FILE):
    self.raw, self.where = dict(raw), where
    self.used: set[str] = set()

  def error(self, key: str, message: str) -> HFError:
    return HFError(f'{self.where}: {key}: {message}')

  def take(self, key: str, default: Any = _REQUIRED) -> Any:
    self.used.add(key)
    if key in self.raw:
      return self.raw[key]
    if default is _REQUIRED:
      raise self.error(key, 'missing')
    return default

  def int(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    v = self.take(key, default)
    if v is None and default is None:
      return v
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
      raise self.error(key, f'must be an integer >= {minimum}, got {v!r}')
    return v

  def number(self, key: str, default: Any = _REQUIRED) -> float:
    v = self.take(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
      raise self.error(key, f'must be a number > 0, got {v!r}')
    return float(v)

  def flag(self, key: str, default: Any = _REQUIRED) -> bool:
    v = self.take(key, default)
    if not isinstance(v, bool):
      raise self.error(key, f'must be true or false, got {v!r}')
    return v

  def expect(self, key: str, allowed: tuple, why: str, default: Any = _REQUIRED) -> Any:
    """The field, which must be one of `allowed` (else an error saying `why`)."""
    v = self.take(key, default)
    if v not in allowed:
      raise self.error(key, f'{v!r} is not supported: {why}')
    return v

  def ignore(self, *keys: str) -> None:
    self.used.update(keys)

  def finish(self) -> None:
    """Stops on the first field no one took."""
    unknown = sorted(set(self.raw) - self.used)
    if unknown:
      raise self.error(unknown[0], 'unknown field for this architecture: litejax does not know whether it changes '
                       f'the model, so it does not convert it ({len(unknown)} such fields)')


def rope_theta(f: ConfigFields, default: float) -> float:
  """θ of plain RoPE, from `rope_theta` or transformers 5's `rope_parameters`; any scaling is an error."""
  params = f.take('rope_parameters', None) or {}
  scaling = f.take('rope_scaling', None) or {}
  if not isinstance(params, dict) or not isinstance(scaling, dict):
    raise f.error('rope_parameters', f'must be an object, got {params!r}')
  for key, spec in (('rope_parameters', params), ('rope_scaling', scaling)):
    kind = spec.get('rope_type', spec.get('type', 'default'))
    if kind != 'default':
      raise f.error(f'{key}.rope_type', f'{kind!r} is not supported: litejax implements plain RoPE for this '
                    'architecture')
    extra = sorted(set(spec) - {'rope_type', 'type', 'rope_theta'})
    if extra:
      raise f.error(f'{key}.{extra[0]}', 'not supported with plain RoPE')
  theta = f.take('rope_theta', params.get('rope_theta', default))
  if 'rope_theta' in params and theta != params['rope_theta']:
    raise f.error('rope_theta', f'{theta} differs from rope_parameters.rope_theta {params["rope_theta"]}')
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
    raise f.error('rope_theta', f'must be a number > 0, got {theta!r}')
  return float(theta)
