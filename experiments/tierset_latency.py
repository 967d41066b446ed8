"""TierSet latency: predicted (litejax.inference.step_latency + the I/O term, what `generate --latency-budget-ms`
uses) against measured per-token latency, for every TierSet of the trained configs/tiny_1k.yaml with
`store.placement=hot,warm,cold,cold` (issue 13 item 3; the target band is latency.TRUST_BAND).

Each TierSet is decoded as `generate --latency-budget-ms` would decode it: device slots and host cache
sized by placement and filled before decoding (hot tiers in slots, warm in the host cache), the TierSet's
tier mask in every router, --miss stall, batch 1; measured = median decode step.

    python experiments/tierset_latency.py --ckpt-dir runs/tiny_1k/ckpt --out experiments/results
    python experiments/tierset_latency.py --quick --out /tmp/tl     # shrunk, untrained (the tests)
"""
from __future__ import annotations

import dataclasses
import statistics
import sys

import harness

PLACEMENT = 'hot,warm,cold,cold'


def measure(cfg, model, store, opts, mask, prompt: list[int], new_tokens: int) -> dict:
  """Median ms per decode step of one TierSet, decoded as generate --latency-budget-ms decodes it."""
  from litejax.inference import tiersets
  from litejax.inference.store.levels import ExpertLevels
  from litejax.inference.store_decode import StoreRuntime
  tiers = ExpertLevels(store, opts, load_width=cfg.moe.k_active)
  try:
    tiersets.preload(cfg, tiers)
    rt = StoreRuntime(cfg, model, tiers, mask, programs=harness.store_programs())
    gen, _ = rt.generate([prompt], new_tokens)
  finally:
    tiers.close()
  steps = gen.step_s[1:] or gen.step_s
  rep = tiers.report(len(gen.step_s), rt.decode_stall_s)
  return {'measured_ms_per_token': 1e3 * statistics.median(steps), 'stall_ms_per_token': rep['stall_ms_per_token'],
          'hit_rate': rep['hit_rate']}


def main(argv=None) -> int:
  ap = harness.parser(__doc__, quick='4 tokens, one validation batch, the quick host probes (untimed; the tests)')
  harness.add_ckpt_dir(ap)
  ap.add_argument('--tokens', type=int, default=32)
  args = ap.parse_args(argv)
  out = harness.out_dir(args.out)
  ckpt = harness.ckpt_dir(args, out)
  if args.quick:
    args.tokens = 4
  source = harness.ensure_checkpoint(ckpt, args.quick)
  cfg, model, store = harness.load_store_model(ckpt, ckpt.parent / 'store')
  from litejax.commands.generate import io_probes
  from litejax.config import from_dict
  from litejax.inference import tiersets
  from litejax.inference.store.levels import LevelOptions
  from litejax.perf.host import measure_host
  placement = PLACEMENT    # tiny_1k (and its --quick shrink) has 4 routing tiers
  cfg = from_dict({'store': {'placement': placement}}, base=cfg)
  prompt = harness.prompt_tokens()
  # --quick: the host chip from the quick probes (fewer programs to compile): the figures are untimed here
  chip = measure_host(repeats=2, quick=True) if args.quick else measure_host(repeats=3)
  store_dir = str(ckpt.parent / 'store')
  chosen, opts = tiersets.choose_for_budget(cfg, model, store, LevelOptions(miss='stall'), batch=1,
                                            cache_len=len(prompt) + args.tokens, budget_ms=1e9,
                                            num_val_batches=1 if args.quick else 2,
                                            io_probes=lambda: io_probes(store_dir, store), chip=chip)
  masks = {ts.name: ts.mask for ts in tiersets.candidates(cfg)}
  rows = []
  for row in chosen['considered']:
    got = measure(cfg, model, store, dataclasses.replace(opts), masks[row['name']], prompt, args.tokens)
    rows.append({**{k: row[k] for k in ('name', 'val_loss', 'selection_fractions', 'compute_ms', 'io_ms',
                                        'predicted_ms_per_token')}, **got,
                 'predicted_over_measured': row['predicted_ms_per_token'] / got['measured_ms_per_token']})
    print(f"{row['name']}: predicted {row['predicted_ms_per_token']:.2f} ms (compute {row['compute_ms']:.2f} + io "
          f"{row['io_ms']:.2f}), measured {got['measured_ms_per_token']:.2f} ms: "
          f"{rows[-1]['predicted_over_measured']:.2f}", flush=True)
  rep = {'checkpoint': str(ckpt), 'checkpoint_source': source, 'placement': placement, 'tokens': args.tokens,
         'compute': chosen['compute'], 'io_probes': chosen['io_probes'], 'tiersets': rows}
  harness.write_json(out, 'tierset_latency.json', rep)
  return 0


if __name__ == '__main__':
  sys.exit(main())
