"""Bounded memory of `litejax import-hf --store`: a synthetic Qwen3-MoE checkpoint of a few GB, imported.

  python experiments/bench_import.py --out /tmp/bench_import            # ~2.6 GB of bf16 safetensors
  python experiments/bench_import.py --quick --out /tmp/bench_import    # a few MB (tests/test_experiments.py)

Writes random weights in Qwen3-MoE's published layout (one tensor per expert, sharded with an index), tensor by
tensor through litejax.hf.weights.write_shards (one tensor in memory at a time), then imports the folder into a
checkpoint + expert store in a fresh child process and reports that process's peak RSS (VmHWM) against its RSS
before the import (JAX and litejax loaded), the checkpoint's size, its largest non-expert tensor, all its
non-expert tensors and one expert, and the import's GB/s. JSON: OUT/bench_import.json.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

import harness

import numpy as np

# Qwen3-MoE's shape at a few GB: 8 layers of 64 experts (h = 768), d = 1024, vocab 32k, bf16.
FULL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            num_experts=64, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=3072,
            vocab_size=32000)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=128,
             vocab_size=512)
SHARD_BYTES = {'full': 512 << 20, 'quick': 256 << 10}


def _config(shape: dict) -> dict:
  return {'architectures': ['Qwen3MoeForCausalLM'], 'model_type': 'qwen3_moe', 'dtype': 'bfloat16',
          'hidden_act': 'silu', 'rms_norm_eps': 1e-6, 'rope_theta': 1e6, 'max_position_embeddings': 4096,
          'decoder_sparse_step': 1, 'mlp_only_layers': [], 'norm_topk_prob': True, 'tie_word_embeddings': False,
          'attention_bias': False, 'use_sliding_window': False, 'sliding_window': None, **shape}


def tensors(shape: dict):
  """(name, shape) of every tensor, in the published order: embeddings, then layer by layer."""
  d, h, e = shape['hidden_size'], shape['moe_intermediate_size'], shape['num_experts']
  q, kv = shape['num_attention_heads'] * shape['head_dim'], shape['num_key_value_heads'] * shape['head_dim']
  out = [('model.embed_tokens.weight', (shape['vocab_size'], d))]
  for i in range(shape['num_hidden_layers']):
    p = f'model.layers.{i}.'
    out += [(p + 'input_layernorm.weight', (d,)), (p + 'post_attention_layernorm.weight', (d,)),
            (p + 'self_attn.q_proj.weight', (q, d)), (p + 'self_attn.k_proj.weight', (kv, d)),
            (p + 'self_attn.v_proj.weight', (kv, d)), (p + 'self_attn.o_proj.weight', (d, q)),
            (p + 'self_attn.q_norm.weight', (shape['head_dim'],)), (p + 'self_attn.k_norm.weight', (shape['head_dim'],)),
            (p + 'mlp.gate.weight', (e, d))]
    for j in range(e):
      out += [(p + f'mlp.experts.{j}.gate_proj.weight', (h, d)), (p + f'mlp.experts.{j}.up_proj.weight', (h, d)),
              (p + f'mlp.experts.{j}.down_proj.weight', (d, h))]
  return out + [('model.norm.weight', (d,)), ('lm_head.weight', (shape['vocab_size'], d))]


def write_checkpoint(folder: pathlib.Path, shape: dict, shard_bytes: int) -> dict:
  """The synthetic Hugging Face folder; returns its sizes."""
  import ml_dtypes

  from litejax.hf.weights import OutTensor, write_shards
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(_config(shape), indent=2))
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def make(s, seed):
    return lambda: np.random.default_rng(seed).standard_normal(s, np.float32).astype(bf16)
  entries = [OutTensor(name, s, bf16, make(s, i)) for i, (name, s) in enumerate(tensors(shape))]
  write_shards(folder, entries, shard_bytes)
  dense = [t for t in entries if '.experts.' not in t.name]
  return {'checkpoint_bytes': sum(t.nbytes for t in entries), 'files': len(list(folder.glob('*.safetensors'))),
          'largest_non_expert_tensor_bytes': max(t.nbytes for t in dense),
          'non_expert_bytes': sum(t.nbytes for t in dense),
          'expert_bytes': 3 * shape['hidden_size'] * shape['moe_intermediate_size'] * 2}


def _rss(field: str) -> int:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def child(hf_dir: str, out: str) -> None:
  """The import, in a process of its own: prints {rss_before, peak_rss, report} as JSON."""
  import jax
  import orbax.checkpoint  # noqa: F401
  import tensorstore  # noqa: F401

  from litejax.hf.importer import import_hf
  jax.device_put(np.zeros(1)).block_until_ready()   # the runtime up before the baseline: not the import's memory
  before = _rss('VmRSS')
  t0 = time.perf_counter()
  rep = import_hf(hf_dir, pathlib.Path(out) / 'ckpt', store=str(pathlib.Path(out) / 'store'), tokenizer=False,
                  seq_len=128)
  print(json.dumps({'rss_before': before, 'peak_rss': _rss('VmHWM'), 'seconds': time.perf_counter() - t0,
                    'report': rep}))


def main(argv=None) -> int:
  p = harness.parser(__doc__, quick='a few MB of checkpoint (the test)')
  p.add_argument('--child', nargs=2, metavar=('HF_DIR', 'OUT'), help=argparse_hidden())
  args = p.parse_args(argv)
  if args.child:
    child(*args.child)
    return 0
  out = harness.out_dir(args.out)
  mode = 'quick' if args.quick else 'full'
  work = out / 'work'
  shutil.rmtree(work, ignore_errors=True)
  t0 = time.perf_counter()
  sizes = write_checkpoint(work / 'hf', QUICK if args.quick else FULL, SHARD_BYTES[mode])
  write_s = time.perf_counter() - t0
  res, err = harness.run_json([sys.executable, __file__, '--out', str(out), '--child', str(work / 'hf'), str(work)],
                              harness.child_env('cpu', 1))
  if err:
    print(f'bench_import: the import failed: {err}', file=sys.stderr)
    return 1
  grew = res['peak_rss'] - res['rss_before']
  row = {'mode': mode, **sizes, 'write_seconds': write_s, 'rss_before_import': res['rss_before'],
         'peak_rss': res['peak_rss'], 'import_rss_growth': grew,
         'growth_over_checkpoint': grew / sizes['checkpoint_bytes'],
         'growth_over_non_expert_bytes': grew / sizes['non_expert_bytes'],
         'import_seconds': res['seconds'], 'gb_per_s': sizes['checkpoint_bytes'] / res['seconds'] / 1e9,
         'experts': res['report']['experts'], 'machine': harness.machine('cpu')}
  harness.write_json(out, 'bench_import.json', row)
  shutil.rmtree(work, ignore_errors=True)
  print(json.dumps(row, indent=1))
  return 0


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


if __name__ == '__main__':
  sys.exit(main())
