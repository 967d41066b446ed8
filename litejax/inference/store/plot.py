"""The store metrics PNG of `litejax generate --store --plot`: hit rate per storage level, lookahead recall per
depth, and per decode step the measured time with its I/O (level lookups) part."""
from __future__ import annotations


def plot_store(report: dict, step_s: list[float], stall_s: list[float], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
  levels = list(report['hit_rate'])
  ax[0].bar(levels, [report['hit_rate'][t] for t in levels], color=['tab:green', 'tab:blue', 'tab:red', 'tab:gray'])
  ax[0].set_ylim(0, 1)
  ax[0].set_title(f'hit rate per storage level ({report["policy"]}, {report["slots_per_layer"]} slots/layer)')
  recall = report['lookahead_recall']
  ax[1].bar([str(d + 1) for d in range(len(recall))], [r or 0 for r in recall])
  ax[1].set_ylim(0, 1)
  ax[1].set_xlabel('lookahead depth (MoE layers)')
  ax[1].set_title('lookahead recall' if recall else 'lookahead recall (no lookahead)')
  steps = range(len(step_s))
  ax[2].plot(steps, [1e3 * s for s in step_s], label='decode step')
  ax[2].plot(steps, [1e3 * s for s in stall_s], label='I/O (level lookups, reads, slot loads)')
  ax[2].set_xlabel('decode step')
  ax[2].set_ylabel('ms')
  ax[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
