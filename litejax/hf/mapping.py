"""Which Hugging Face tensor fills which litejax parameter, and the checks that nothing is left over.

A family (litejax.hf.families) states its mapping as two lists for a config:
  `Tensor`       one litejax parameter <- one HF tensor (same layout, or nn.Linear's [out, in] transposed);
  `ExpertArray`  one routed-expert array of one MoE layer (litejax [E, in, out]) <- either E tensors, one per
                 expert (published checkpoints: `...experts.{e}.gate_proj.weight`), or rows of one fused
                 [E, rows, in] tensor (transformers 5's `mlp.experts.gate_up_proj`, gate rows first).
HF names here are *canonical*: transformers 5's own module names; a family's `canonical` maps a file's names
onto them (Mixtral's published `block_sparse_moe` onto `mlp`) and `published` back.

`plan_import` checks, from file headers alone, that every litejax parameter has a source, every source has
the expected shape, every tensor of the checkpoint is used, and which layout each MoE layer's experts are in.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from litejax.config import Config
from litejax.hf.weights import HFError, WeightIndex

LAYOUTS = ('per-expert', 'fused')
# Buffers some checkpoints carry that the forward derives from the config (rotary frequencies): skipped, and
# listed in the import's report.
DERIVED_SUFFIXES = ('.rotary_emb.inv_freq',)


def leaf_dtype(leaf: str, np_dtype: np.dtype) -> np.dtype:
  """The dtype a leaf is stored in: the parameter dtype, float32 for state (RouterBias is float32)."""
  return np_dtype if leaf.startswith('params/') else np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One litejax parameter from one HF tensor. in_axes 0: the same layout; n > 0: HF stores an nn.Linear
  weight [out, in] where `in` is litejax's first n axes (w_q [d, H, hd] <- q_proj [H·hd, d]: 1)."""
  leaf: str           # litejax checkpoint leaf name, 'params/blocks/0/attn/w_q'
  hf: str             # canonical HF name, 'model.layers.0.self_attn.q_proj.weight'
  in_axes: int = 0

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not self.in_axes:
      return tuple(shape)
    return (math.prod(shape[self.in_axes:]), math.prod(shape[:self.in_axes]))

  def to_litejax(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray((x.T if self.in_axes else x).reshape(shape))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if not self.in_axes:
      return x
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:self.in_axes]), -1).T)


@dataclasses.dataclass(frozen=True)
class ExpertArray:
  """One routed-expert array of one MoE layer, litejax [E, in, out] (w_in/w_gate [E, d, h], w_out [E, h, d]);
  expert e's HF matrix is [out, in]."""
  layer: int
  array: str                        # 'w_in' | 'w_gate' | 'w_out'
  per_expert: str                   # canonical name of expert e's matrix, with '{e}'
  fused: str                        # canonical name of the [E, rows, in] tensor of every expert
  rows: tuple[int, int] | None      # this array's rows of `fused`; None: all of them

  @property
  def leaf(self) -> str:
    return f'params/blocks/{self.layer}/ffn/{self.array}'

  def from_matrix(self, matrix_oi: np.ndarray, fused: bool) -> np.ndarray:
    """litejax's [in, out] of one expert from its HF matrix: its per-expert tensor, or fused[e] (this array's rows)."""
    m = matrix_oi[self.rows[0]:self.rows[1]] if fused and self.rows is not None else matrix_oi
    return m.T


@dataclasses.dataclass(frozen=True)
class Family:
  """What litejax knows of one transformers architecture (registered in litejax.hf.families.FAMILIES)."""
  name: str                                        # `export-hf --family`, e.g. 'qwen3_moe'
  architecture: str                                # config.json architectures[0], e.g. 'Qwen3MoeForCausalLM'
  model_type: str                                  # config.json model_type
  to_config: Callable[..., Config]                 # (ConfigFields, dtype, seq_len) -> Config; HFError naming the field
  export_problems: Callable[[Config], list[str]]   # why a litejax config does not map (each names the field)
  to_hf_config: Callable[[Config], dict]           # the config.json fields that decide the forward pass
  tensors: Callable[[Config], list[Tensor]]
  experts: Callable[[Config], list[ExpertArray]]
  canonical: Callable[[str], str] = lambda name: name   # a file's tensor name -> the mapping's
  published: Callable[[str], str] = lambda name: name   # the mapping's -> a one-tensor-per-expert checkpoint's
  # litejax state leaves the architecture has no tensor for and whose value does not change its forward pass
  # (DeepSeek-V3's tier and group selection biases): imported as zeros, not exported.
  zeros: Callable[[Config], list[str]] = lambda cfg: []
  # (tensor name prefixes, why) of modules a config.json declares that litejax does not model (DeepSeek-V3's
  # multi-token-prediction layers): their tensors are skipped and listed in the import's report.
  not_modelled: Callable[[dict], tuple[tuple[str, ...], str]] = lambda raw: ((), '')


@dataclasses.dataclass(frozen=True)
class ImportPlan:
  tensors: list[Tensor]
  experts: list[ExpertArray]
  layouts: dict[int, str]          # MoE layer -> 'per-expert' | 'fused'
  skipped: list[str]               # derived buffers (DERIVED_SUFFIXES) not converted
  zeros: list[str] = dataclasses.field(default_factory=list)          # state leaves filled with zeros
  not_modelled: list[str] = dataclasses.field(default_factory=list)   # tensors of modules litejax lacks


def plan_import(cfg: Config, family: Family, index: WeightIndex, shapes: dict[str, tuple[int, ...]],
                not_modelled: tuple[str, ...] = ()) -> ImportPlan:
  """The mapping of `index` onto litejax parameters and state `shapes` ({leaf: shape}), checked from headers
  alone; tensors whose names start with a `not_modelled` prefix are skipped (and listed)."""
  tensors, experts, zeros = family.tensors(cfg), family.experts(cfg), family.zeros(cfg)
  filled = [t.leaf for t in tensors] + [e.leaf for e in experts] + zeros
  unfilled = sorted(set(shapes) - set(filled))
  if unfilled:
    raise HFError(f'{family.architecture}: litejax parameter {unfilled[0]} has no source tensor in the mapping '
                  f'({len(unfilled)} such parameters)')
  assert set(filled) <= set(shapes), sorted(set(filled) - set(shapes))
  used: set[str] = set()
  for t in tensors:
    _check_shape(index, t.hf, t.hf_shape(shapes[t.leaf]), t.leaf)
    used.add(t.hf)
  layouts: dict[int, str] = {}
  for layer in sorted({e.layer for e in experts}):
    arrays = [e for e in experts if e.layer == layer]
    layouts[layer] = _expert_layout(index, arrays, shapes, used)
  skipped = sorted(n for n in index.tensors if n not in used and n.endswith(DERIVED_SUFFIXES))
  lacking = sorted(n for n in index.tensors if n not in used and not_modelled and n.startswith(not_modelled))
  unused = sorted(set(index.tensors) - used - set(skipped) - set(lacking))
  if unused:
    t = index.tensors[unused[0]]
    raise HFError(f'{t.file.name}: tensor {t.name} {t.shape} has no place in litejax\'s {family.architecture} '
                  f'(a bias, an extra module, or more layers/experts than config.json says; {len(unused)} such '
                  'tensors)')
  return ImportPlan(tensors, experts, layouts, skipped, zeros, lacking)


def _check_shape(index: WeightIndex, name: str, want: tuple[int, ...], leaf: str) -> None:
  if name not in index:
    raise HFError(f'tensor {name} is missing (it fills litejax {leaf})')
  if tuple(index.shape(name)) != tuple(want):
    t = index.tensors[name]
    raise HFError(f'{t.file.name}: tensor {t.name} has shape {t.shape}, config.json implies {want} (litejax {leaf})')


def _expert_layout(index: WeightIndex, arrays: list[ExpertArray], shapes, used: set[str]) -> str:
  """'per-expert' or 'fused' for one MoE layer, every tensor it needs checked and marked used."""
  e = shapes[arrays[0].leaf][0]
  per = [a.per_expert.format(e=i) for a in arrays for i in range(e)]
  fused = sorted({a.fused for a in arrays})
  has_per, has_fused = any(n in index for n in per), any(n in index for n in fused)
  layer = arrays[0].layer
  if has_per and has_fused:
    raise HFError(f'layer {layer}: holds both one tensor per expert ({per[0]}) and fused expert tensors '
                  f'({fused[0]}); keep one layout')
  if has_fused:
    for name in fused:
      mine = [a for a in arrays if a.fused == name]
      a = mine[0]
      rows = max(x.rows[1] for x in mine) if a.rows else shapes[a.leaf][2]
      _check_shape(index, name, (e, rows, shapes[a.leaf][1]), a.leaf)
      used.add(name)
    return 'fused'
  for a in arrays:
    _, d_in, d_out = shapes[a.leaf]
    for i in range(e):
      _check_shape(index, a.per_expert.format(e=i), (d_out, d_in), f'{a.leaf}[{i}]')
      used.add(a.per_expert.format(e=i))
  return 'per-expert'


# ---------------------------------------------------------------------------- the Llama-style decoder

def decoder_tensors(cfg: Config, qk_norm: bool, moe_router: str) -> list[Tensor]:
  """Embedding, final norm, unembedding and every layer's norms, attention and dense FFN, as transformers'
  Llama-style decoders name them (Mixtral, Qwen3-MoE, ...); an MoE layer's router is `mlp.<moe_router>`."""
  mc = cfg.model
  out = [Tensor('params/embed', 'model.embed_tokens.weight'), Tensor('params/final_norm/scale', 'model.norm.weight')]
  if not mc.tie_embeddings:
    out.append(Tensor('params/unembed', 'lm_head.weight', 1))
  for i in range(mc.num_layers):
    lj, hf = f'params/blocks/{i}/', f'model.layers.{i}.'
    out += [Tensor(lj + 'attn_norm/scale', hf + 'input_layernorm.weight'),
            Tensor(lj + 'ffn_norm/scale', hf + 'post_attention_layernorm.weight'),
            Tensor(lj + 'attn/w_q', hf + 'self_attn.q_proj.weight', 1),
            Tensor(lj + 'attn/w_k', hf + 'self_attn.k_proj.weight', 1),
            Tensor(lj + 'attn/w_v', hf + 'self_attn.v_proj.weight', 1),
            Tensor(lj + 'attn/w_o', hf + 'self_attn.o_proj.weight', 2)]
    if qk_norm:
      out += [Tensor(lj + 'attn/q_norm/scale', hf + 'self_attn.q_norm.weight'),
              Tensor(lj + 'attn/k_norm/scale', hf + 'self_attn.k_norm.weight')]
    if mc.is_moe_layer(i):
      out.append(Tensor(lj + 'ffn/router_expert', hf + f'mlp.{moe_router}.weight', 2))
    else:
      out += [Tensor(lj + 'ffn/w_gate', hf + 'mlp.gate_proj.weight', 1),
              Tensor(lj + 'ffn/w_in', hf + 'mlp.up_proj.weight', 1),
              Tensor(lj + 'ffn/w_out', hf + 'mlp.down_proj.weight', 1)]
  return out


def glu_experts(cfg: Config, names: dict[str, str]) -> list[ExpertArray]:
  """Every MoE layer's SwiGLU experts: per-expert `mlp.experts.{e}.<names[array]>.weight`, fused
  `mlp.experts.gate_up_proj` [E, 2h, d] (gate rows, then up) and `mlp.experts.down_proj` [E, d, h]."""
  h = cfg.moe.d_expert
  out = []
  for i in range(cfg.model.num_layers):
    if not cfg.model.is_moe_layer(i):
      continue
    p = f'model.layers.{i}.mlp.experts.'
    out += [ExpertArray(i, 'w_gate', p + '{e}.' + names['w_gate'] + '.weight', p + 'gate_up_proj', (0, h)),
            ExpertArray(i, 'w_in', p + '{e}.' + names['w_in'] + '.weight', p + 'gate_up_proj', (h, 2 * h)),
            ExpertArray(i, 'w_out', p + '{e}.' + names['w_out'] + '.weight', p + 'down_proj', None)]
  return out
