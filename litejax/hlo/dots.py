"""The FLOPs of one dot or convolution instruction of optimized HLO, as XLA's HloCostAnalysis counts them
(a multiply-add is 2). litejax.hlo.flops charges them to components. The TPU compiler lowers dots as
convolutions, a batched dot (the attention's) as one with lhs dilation: `conv_flops` counts only the
window taps that land on an input element, so it prices those at the dot's FLOPs.
"""
from __future__ import annotations

import math
import re

from litejax.hlo.parse import Computation, Instr


def dot_flops(ins: Instr, comp: Computation) -> float:
  """2 · |out| · |contracting| of a dot instruction."""
  lhs = comp.instrs.get(ins.operands[0])
  if lhs is None:
    return 0.0
  contracting = math.prod(lhs.shapes[0][1][i] for i in ins.dims_attr('lhs_contracting_dims'))
  return 2.0 * ins.elements * contracting


def conv_flops(ins: Instr, comp: Computation) -> float:
  """2 · multiply-adds of a convolution: input features per group × output features × batch per batch
  group × the (output position, kernel tap) pairs of each spatial dimension that read an input element,
  not padding or a hole of lhs dilation."""
  lhs, rhs = comp.instrs.get(ins.operands[0]), comp.instrs.get(ins.operands[1])
  m = re.fullmatch(r'(\w+)_(\w+)->(\w+)', ins.attr('dim_labels') or '')
  if lhs is None or rhs is None or not m:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  lhs_d, rhs_d, out_d = lhs.shapes[0][1], rhs.shapes[0][1], ins.shapes[0][1]
  pairs = 1
  for s, w in enumerate(conv_window(ins.attr('window') or '', sum(c.isdigit() for c in rhs_l))):
    pairs *= _valid_pairs(lhs_d[lhs_l.index(str(s))], rhs_d[rhs_l.index(str(s))], out_d[out_l.index(str(s))], w)
  groups = int(ins.attr('feature_group_count') or 1)
  batch_groups = int(ins.attr('batch_group_count') or 1)
  fmas = (lhs_d[lhs_l.index('f')] // groups) * rhs_d[rhs_l.index('o')] * (lhs_d[lhs_l.index('b')] // batch_groups)
  return 2.0 * fmas * pairs


def conv_window(attr: str, spatial: int) -> list[dict]:
  """Per spatial dimension of a convolution's `window={size=3x3 stride=2x2 pad=1_1x0_1 lhs_dilate=..
  rhs_dilate=..}`: stride, pad (low, high), lhs_dilate, rhs_dilate (defaults 1, (0, 0), 1, 1)."""
  fields = dict(f.split('=', 1) for f in attr.strip('{}').split() if '=' in f)

  def at(key: str, s: int, default: int) -> int:
    return int(fields[key].split('x')[s]) if key in fields else default

  return [{'stride': at('stride', s, 1), 'lhs_dilate': at('lhs_dilate', s, 1), 'rhs_dilate': at('rhs_dilate', s, 1),
           'pad': tuple(int(x) for x in fields['pad'].split('x')[s].split('_')) if 'pad' in fields else (0, 0)}
          for s in range(spatial)]


def _valid_pairs(in_size: int, kernel: int, out_size: int, w: dict) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read an input element."""
  n = 0
  for o in range(out_size):
    for k in range(kernel):
      pos = o * w['stride'] - w['pad'][0] + k * w['rhs_dilate']   # in the lhs-dilated, padded input
      if pos % w['lhs_dilate'] == 0 and 0 <= pos // w['lhs_dilate'] < in_size:
        n += 1
  return n
