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

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_tiers  # noqa: E402  (the checkpoint, store and prompt)

PLACEMENT = 'hot,warm,cold,cold'


def measure(cfg, model, store, opts, mask, prompt: list[int], new_tokens: int) -> dict:
  """Median ms per decode step of one TierSet, decoded as generate --latency-budget-ms decodes it."""
  from litejax.inference import tiersets
  from litejax.inference.store.levels import Tiers
  from litejax.inference.store_decode import TieredRuntime
  tiers = Tiers(store, opts, load_width=cfg.moe.k_active)
  try:
    tiersets.preload(cfg, tiers)
    rt = TieredRuntime(cfg, model, tiers, mask)
    gen, _ = rt.generate([prompt], new_tokens)
  finally:
    tiers.close()
  steps = gen.step_s[1:] or gen.step_s
  rep = tiers.report(len(gen.step_s), rt.decode_stall_s)
  return {'measured_ms_per_token': 1e3 * statistics.median(steps), 'stall_ms_per_token': rep['stall_ms_per_token'],
          'hit_rate': rep['hit_rate']}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True)
  ap.add_argument('--ckpt-dir', default=None,
                  help='tiny_1k checkpoint (default: runs/tiny_1k/ckpt; --quick: OUT/ckpt), trained if missing')
  ap.add_argument('--tokens', type=int, default=32)
  ap.add_argument('--quick', action='store_true')
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  ckpt = pathlib.Path(args.ckpt_dir or (out / 'ckpt' if args.quick else 'runs/tiny_1k/ckpt'))
  if args.quick:
    args.tokens = 4
    # the host chip from the quick probes (fewer programs to compile): the figures are untimed here
    from litejax.perf import host
    host.host_chip = functools.partial(host.host_chip, quick=True)
  source = bench_tiers.ensure_checkpoint(ckpt, args.quick)
  cfg, model, store = bench_tiers.load(ckpt, ckpt.parent / 'store')
  from litejax.commands.generate import io_probes
  from litejax.config import from_dict
  from litejax.inference import tiersets
  from litejax.inference.store.levels import TierOptions
  placement = PLACEMENT    # tiny_1k (and its --quick shrink) has 4 routing tiers
  cfg = from_dict({'store': {'placement': placement}}, base=cfg)
  prompt = [int(b) for b in bench_tiers.PROMPT.encode()]
  chosen, opts = tiersets.choose_for_budget(cfg, model, store, TierOptions(miss='stall'), batch=1,
                                            cache_len=len(prompt) + args.tokens, budget_ms=1e9,
                                            num_val_batches=1 if args.quick else 2,
                                            io_probes=lambda: io_probes(str(ckpt.parent / 'store'), store))
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
  (out / 'tierset_latency.json').write_text(json.dumps(rep, indent=1, default=float))
  return 0


if __name__ == '__main__':
  sys.exit(main())
