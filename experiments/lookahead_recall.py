"""Router lookahead recall per depth (issue 13), measured two ways on real decoded text from the trained
configs/tiny_1k.yaml: which hidden state should layer l+d's router (with its own ffn_norm) be applied to?

  after_attn   layer l's residual stream after its attention, before its MoE output is added: what
               litejax.inference.store_decode.moe_pre uses (available before layer l's experts run, so the
               prefetch overlaps them)
  after_moe    the residual stream entering layer l+1 (after layer l's attention AND its MoE): the closest
               state available before layer l+1 runs (the prefetch then overlaps layer l+1's attention only)
The state the router really sees, layer l+d's own post-attention stream, gives recall 1 by definition
(the reference); its cosine similarity to each proxy says how far the stream moves per layer.

`width` rows: the runtime's prefetch set (litejax.inference.store.lookahead: the router's K picks widened to the
best W·K beam paths) from the after_moe proxy, against W: expert recall per depth and the candidates the
predicted layer did not use (extra bytes per token for a cold cache).

Recall at depth d = mean over decode tokens of |predicted ∩ used| / |used| (batch 1: per token), at the
expert, group and tier level. The decode is the store runtime with every expert resident (no I/O), its
per-layer programs wrapped to record the states.

    python experiments/lookahead_recall.py --ckpt-dir runs/tiny_1k/ckpt --store runs/tiny_1k/store \\
        --tokens 256 --widths 1,2,4,8,16,32 --out experiments/results
    python experiments/lookahead_recall.py --quick --out /tmp/lr     # shrunk model, untrained (the tests)
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

import harness

PROXIES = ('after_attn', 'after_moe')


def record_decode(cfg, model, store, prompt: str, new_tokens: int, temperature: float, seed: int):
  """(per decode step: [(after_attn [1,d], after_moe [1,d], experts [K], groups [K])] per MoE layer, layers)."""
  from litejax.train import data
  from litejax.inference.sampling import Sampling
  from litejax.inference.store.levels import LevelOptions
  from litejax.inference.store_programs import Hooks
  steps, cur = [], []

  class States(Hooks):
    """The runtime's hooks, keeping each decode step's moe_pre and finish outputs."""

    def call(self, program, *args, **kwargs):
      out = program.fn(*args, **kwargs)
      if program.name == 'moe_pre' and out[0].shape[1] == 1:    # decode steps only: [B=1, S=1, d]
        cur.append([np.asarray(out[0][0, 0], np.float32), None, np.asarray(out[2][0]), np.asarray(out[4][0])])
      elif program.name == 'finish' and out.shape[1] == 1:
        cur[-1][1] = np.asarray(out[0, 0], np.float32)
        if len(cur) == cfg.model.num_moe_layers:
          steps.append(list(cur))
          cur.clear()
      return out

  opts = LevelOptions(1.0, 1.0, 'lru', 0, 'stall')
  gen, _, _, rt = harness.tiered_decode(cfg, model, store, opts, data.encode(prompt).astype(int).tolist(),
                                        new_tokens, Sampling(temperature), seed, preload=True, hooks=States())
  return steps, rt.moe, data.decode(gen.tokens[0])


def _router_fn(cfg, norm_graphdef):
  """A jitted (ffn_norm state, router, bias, x [N, d]) -> (experts, groups, tiers) [N, K] for one layer."""
  import jax
  from flax import nnx

  from litejax.model.moe import routing

  @jax.jit
  def f(norm_state, router, bias, x_nd):
    r = routing.route(nnx.merge(norm_graphdef, norm_state)(x_nd), router, cfg.moe, bias)
    return r.expert_nk, r.group_nk, r.tier_nk
  return f


def recall_table(cfg, steps, moe_layers, max_depth: int) -> dict:
  """{proxy: {level: [recall at depth 1..D]}} and the cosine similarity of each proxy to the true input."""
  fns = {}
  L = len(moe_layers)
  groups_per_tier = cfg.moe.groups_per_tier
  out = {p: {'expert': [], 'group': [], 'tier': []} for p in PROXIES}
  cosine = {p: [] for p in PROXIES}
  for d in range(1, max_depth + 1):
    sums = {p: {'expert': [], 'group': [], 'tier': []} for p in PROXIES}
    for j in range(L - d):
      tgt = moe_layers[j + d]
      f = fns.setdefault(tgt.index, _router_fn(cfg, tgt.gate.norm_graphdef))
      for p_i, proxy in enumerate(PROXIES):
        x = np.stack([s[j][p_i] for s in steps])
        e_nk, g_nk, _ = (np.asarray(a) for a in f(tgt.gate.norm_state, tgt.gate.router, tgt.gate.bias, x))
        for n, s in enumerate(steps):
          used_e, used_g = set(s[j + d][2].tolist()), set(s[j + d][3].tolist())
          sums[proxy]['expert'].append(len(used_e & set(e_nk[n].tolist())) / len(used_e))
          sums[proxy]['group'].append(len(used_g & set(g_nk[n].tolist())) / len(used_g))
          used_t = {g // groups_per_tier for g in used_g}
          sums[proxy]['tier'].append(len(used_t & {g // groups_per_tier for g in g_nk[n].tolist()}) / len(used_t))
          if d == 1:
            true = s[j + 1][0]
            v = s[j][p_i]
            cosine[proxy].append(float(v @ true / (np.linalg.norm(v) * np.linalg.norm(true) + 1e-12)))
    for proxy in PROXIES:
      for level in ('expert', 'group', 'tier'):
        out[proxy][level].append(float(np.mean(sums[proxy][level])) if sums[proxy][level] else None)
  # Depth 0 with the layer's own post-attention state must reproduce the experts the decode used.
  self_check = []
  for j, layer in enumerate(moe_layers):
    f = fns.setdefault(layer.index, _router_fn(cfg, layer.gate.norm_graphdef))
    e_nk = np.asarray(f(layer.gate.norm_state, layer.gate.router, layer.gate.bias,
                        np.stack([s[j][0] for s in steps]))[0])
    self_check += [set(e_nk[n].tolist()) == set(s[j][2].tolist()) for n, s in enumerate(steps)]
  return {'recall': out, 'cosine_to_true_router_input_depth1': {p: float(np.mean(c)) for p, c in cosine.items()},
          'self_check_depth0': float(np.mean(self_check))}


def _candidates_fn(cfg, norm_graphdef, width: int):
  """A jitted (ffn_norm state, router, bias, x [N, d]) -> [N, W·K] lookahead candidates for one layer."""
  import jax
  from flax import nnx

  from litejax.inference.store import lookahead

  @jax.jit
  def f(norm_state, router, bias, x_nd):
    return lookahead.candidates(nnx.merge(norm_graphdef, norm_state)(x_nd), router, cfg.moe, bias, width=width)
  return f


def width_table(cfg, steps, moe_layers, max_depth: int, widths, expert_bytes: int) -> list[dict]:
  """Per width W (proxy after_moe, what the runtime uses): expert recall per depth, and the candidates
  per token and layer that the layer then did not use (`wasted`: the extra reads of a cold cache, in
  experts and bytes per token summed over the predicted layers; the runtime reads fewer, since candidates
  already in a tier are not read again)."""
  p_i = PROXIES.index('after_moe')
  L = len(moe_layers)
  rows = []
  for w in widths:
    recall, wasted = [], []
    for d in range(1, max_depth + 1):
      hits, per_token = [], np.zeros(len(steps))
      for j in range(L - d):
        tgt = moe_layers[j + d]
        f = _candidates_fn(cfg, tgt.gate.norm_graphdef, w)
        x = np.stack([s[j][p_i] for s in steps])
        cand = np.asarray(f(tgt.gate.norm_state, tgt.gate.router, tgt.gate.bias, x))
        for n, s in enumerate(steps):
          used, got = set(s[j + d][2].tolist()), set(cand[n].tolist())
          hits.append(len(used & got) / len(used))
          per_token[n] += len(got - used)
      recall.append(float(np.mean(hits)) if hits else None)
      wasted.append(float(per_token.mean()))
    rows.append({'width': w, 'candidates_per_layer': w * cfg.moe.k_active, 'expert_recall': recall,
                 'wasted_experts_per_token': wasted,
                 'wasted_bytes_per_token': [x * expert_bytes for x in wasted]})
    print(f"width {w}: recall {['%.3f' % r for r in recall if r is not None]} wasted experts/token "
          f"{['%.1f' % x for x in wasted]}", flush=True)
  return rows


def main(argv=None) -> int:
  ap = harness.parser(__doc__, quick='the shrunk tiny_1k (when it trains one), 8 tokens, widths 1,32 (the tests)')
  harness.add_ckpt_dir(ap)
  ap.add_argument('--store', default=None, help='store of the checkpoint\'s experts (default: CKPT/../store)')
  ap.add_argument('--tokens', type=int, default=256)
  ap.add_argument('--temperature', type=float, default=1.0)
  ap.add_argument('--widths', default=None,
                  help='lookahead widths W to measure (comma-separated; default 1,2,4,8,16,32; --quick: 1,32)')
  args = ap.parse_args(argv)
  out = harness.out_dir(args.out)
  ckpt = harness.ckpt_dir(args, out)
  if args.quick:
    args.tokens = 8
  # each width compiles its own candidates program: quick keeps the narrowest and the widest
  args.widths = args.widths or ('1,32' if args.quick else '1,2,4,8,16,32')
  source = harness.ensure_checkpoint(ckpt, args.quick)
  store_dir = pathlib.Path(args.store) if args.store else ckpt.parent / 'store'
  cfg, model, store = harness.load_store_model(ckpt, store_dir)
  steps, moe_layers, text = record_decode(cfg, model, store, harness.PROMPT, args.tokens, args.temperature, 0)
  rep = {'checkpoint': str(ckpt), 'checkpoint_source': source, 'decode_tokens': len(steps),
         'temperature': args.temperature, 'moe_layers': len(moe_layers), 'd_model': cfg.model.d_model,
         'experts_per_layer': cfg.moe.experts_total, 'k': cfg.moe.k_active,
         **recall_table(cfg, steps, moe_layers, len(moe_layers) - 1),
         'expert_bytes': store.expert_bytes,
         'width': width_table(cfg, steps, moe_layers, len(moe_layers) - 1,
                              [int(w) for w in args.widths.split(',')], store.expert_bytes), 'text': text}
  harness.write_json(out, 'lookahead_recall.json', rep, indent=2)
  print(json.dumps({k: v for k, v in rep.items() if k != 'text'}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
