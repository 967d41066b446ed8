"""`litejax params`: parameter counts and the analytic per-token FLOPs of a config.

Counts come from `jax.eval_shape` of the real model (nothing is allocated), cross-checked against
the closed-form counts in litejax.model.bounds, so configs/quadrillion.yaml answers in seconds.
"""
from __future__ import annotations

import argparse
import json

from litejax import units
from litejax.model import bounds
from litejax.commands.args import add_config_arguments, config_from_args, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_config_arguments(parser, checkpoint=True)
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--tokens-per-group', type=positive_int, default=None,
                      help='N for capacity padding (default: train.batch_size * model.seq_len)')


def run(args: argparse.Namespace) -> int:
  cfg = config_from_args(args)
  n = args.tokens_per_group or cfg.train.batch_size * cfg.model.seq_len
  out = bounds.summary(cfg, n)
  from litejax.analysis.footprint import count_model_params
  out['params_total_from_model'] = count_model_params(cfg)
  if out['params_total_from_model'] != out['params_total']:
    raise AssertionError(f"bounds.param_counts ({out['params_total']}) disagrees with the model "
                         f"({out['params_total_from_model']}): fix litejax/bounds.py")
  if args.json:
    print(json.dumps(out, indent=2))
    return 0
  h = units.si
  sf = out['spec_formula']
  print(f'config: {args.config}')
  print(f"parameters         total {h(out['params_total'])} ({out['params_total']:,})")
  print(f"  routed experts   {h(out['params_expert_total'])} in {out['experts_total']:,} experts "
        f"({out['experts_per_layer']:,} per MoE layer x {out['moe_layers']} layers, "
        f"{h(out['params_per_expert'])} each)")
  print(f"  router           {h(out['params_router_total'])}")
  print(f"  dense+embeddings {h(out['params_dense'])}")
  print(f"active per token   {h(out['params_active_per_token'])} "
        f"(experts {h(out['params_expert_active_per_token'])}: K={out['k_active']} x {out['moe_layers']} layers)")
  print(f"forward FLOPs/token {h(out['flops_per_token_analytic'])} unpadded; "
        f"{h(out['flops_per_token_analytic_padded'])} with capacity padding at N={n} "
        f"(dispatch={out['dispatch']}, C={out['capacity_per_expert']})")
  print(f"spec: {sf['formula']}")
  print(f"      L={sf['L']} d={sf['d']} h={sf['h']} K={sf['K']} a={sf['a']:.3g} b={sf['b']:.3g} -> "
        f"{h(sf['two_term_flops'])} + extras {h(sf['extras_flops'])} = {h(sf['total_flops'])}")
  for name, v in out['by_component'].items():
    print(f'  {name:18s} {h(v):>8s}  {100 * v / max(out["flops_per_token_analytic_padded"], 1):5.1f}%')
  return 0
