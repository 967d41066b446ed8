"""`litejax export-hf`: a litejax checkpoint as a Hugging Face folder transformers' from_pretrained loads.

  litejax export-hf --ckpt-dir runs/mixtral/ckpt --out exported/

The config must map onto Mixtral or Qwen3-MoE (flat softmax top-k routing, SwiGLU experts, no shared
experts; Qwen3-MoE when model.qk_norm): otherwise one line names the field, before anything is written.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--ckpt-dir', required=True, help='checkpoint folder (litejax train or import-hf)')
  parser.add_argument('--out', required=True, metavar='HF_DIR', help='the Hugging Face folder to write')
  parser.add_argument('--family', help='mixtral or qwen3_moe (default: the one the config maps onto)')
  parser.add_argument('--layout', default='per-expert', choices=('per-expert', 'fused'),
                      help='per-expert: one tensor per expert, as published checkpoints (default); fused: '
                           "transformers 5's [E, ...] expert tensors")
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), help='tensor dtype (default: the model\'s)')
  parser.add_argument('--step', type=int, help='checkpoint step (default: the newest intact one)')
  parser.add_argument('--shard-mib', type=float, default=2048.0, help='largest safetensors shard, MiB (default 2048)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing Hugging Face folder at --out')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def run(args: argparse.Namespace) -> int:
  from litejax.env import set_cpu_device_count
  set_cpu_device_count(1)
  from litejax.hf.exporter import export_hf
  rep = export_hf(args.ckpt_dir, args.out, family_name=args.family, layout=args.layout, dtype=args.dtype,
                  step=args.step, overwrite=args.overwrite, shard_bytes=int(args.shard_mib * (1 << 20)))
  if args.json:
    print(json.dumps(rep, indent=2))
  else:
    print(f'exported step {rep["step"]} as {rep["architecture"]} ({rep["layout"]}, {rep["dtype"]}) to {rep["out"]}: '
          f'{rep["tensors"]} tensors, {rep["bytes"] / 2**20:.1f} MiB in {len(rep["files"])} file(s)')
  return 0
