"""This CPU as a latency-model chip: the probes of litejax.perf.probes timed interleaved, and the
chip derived from their medians (peak FLOP/s, streaming, transpose and gather bandwidths, seconds per
sort comparison, per-kernel and per-host-call overheads)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from litejax.perf import chips as hardware
from litejax.perf import probes as hp, timing
from litejax.perf.probes import call_overhead, kernel_overhead


def host_probes(quick: bool):
  """(the probes to time, a function of their median seconds -> the host Chip)."""
  peak_t, flops = hp.peak_probe(256 if quick else 512)
  bw_t, bw_bytes = hp.bandwidth_probe(16 if quick else 256)
  tr_t, tr_bytes = hp.transpose_probe((8, 64, 4, 32) if quick else (32, 256, 4, 32))
  chains = hp.overhead_probes((2, 6) if quick else (8, 40))
  call_t, call_prog = hp.call_probe()
  gather_t, gather_b = hp.gather_probe()
  sort_t, sort_n = hp.sort_probe()

  def host(seconds: dict[str, float]) -> hardware.Chip:
    peak, bw, t_bw = flops / seconds['peak'], bw_bytes / seconds['bandwidth'], tr_bytes / seconds['transpose']
    g_bw, sort_s = gather_b / seconds['gather'], seconds['sort'] / sort_n
    kernel_s = kernel_overhead([(c, seconds[t.name]) for t, c in chains],
                               hardware.cpu_chip(peak, bw, transpose_bytes_per_s=t_bw, gather_bytes_per_s=g_bw,
                                                  sort_comparison_s=sort_s))
    chip = hardware.cpu_chip(peak, bw, kernel_overhead_s=kernel_s, transpose_bytes_per_s=t_bw,
                              gather_bytes_per_s=g_bw, sort_comparison_s=sort_s)
    call_s = call_overhead(call_prog, seconds['call'], chip)
    return dataclasses.replace(chip, call_overhead_s=call_s)

  return [peak_t, bw_t, tr_t, call_t, gather_t, sort_t] + [t for t, _ in chains], host


def measure_host(repeats: int = 5, quick: bool = False,
                 between: Callable[[], object] | None = None) -> hardware.Chip:
  """This CPU as a hardware.Chip (peak, bandwidths, per-kernel and per-call overheads), from the
  probes alone: what a caller that predicts a step on this machine (`bound --decode`, `generate --json`,
  a decode benchmark) measures and passes on, a few seconds (quick: smaller probes, under two); nothing
  is cached. CPU only: a TPU target keeps its datasheet chip (litejax.analysis.targets.resolve).
  `between()`, when given, runs after each round of probes: a caller times its own step there, so
  that on a shared machine host and step are measured under the same load."""
  probes, host = host_probes(quick)
  return host(timing.median_interleaved(probes, repeats, between))
