"""litejax.hlo.parse: one parser, one dtype table and one trip-count rule for every HLO reader."""
import pytest

from litejax.hlo import collectives as comm, parse as hlo, flops as hlo_cost

HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %m = f32[4,8]{1,0} multiply(%x, %x)
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %m)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%cond_unknown (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %f = pred[] constant(false)
}

ENTRY %main (a: f32[4,8], q: s4[64]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %q = s4[64]{0} parameter(1)
  %t = (s32[], f32[4,8]{1,0}) tuple(%z, %a)
  %known = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %by_cond = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body
  %unknown = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond_unknown, body=%body
  %r = f32[] reduce(%a, %zero), dimensions={0,1}, to_apply=%add
  ROOT %ar = f32[4,8]{1,0} all-reduce(%a), replica_groups={}, to_apply=%add
}
"""


def test_parse_computations_and_shapes():
  m = hlo.parse(HLO)
  assert m.entry == 'main' and set(m.computations) == {'add', 'body', 'cond', 'cond_unknown', 'main'}
  main = m['main']
  assert main.root == 'ar'
  assert main.instrs['t'].shapes == [('s32', ()), ('f32', (4, 8))]
  assert main.instrs['q'].nbytes == 32          # s4: half a byte per element, packed
  assert main.instrs['a'].param_index == 0 and main.instrs['q'].param_index == 1
  assert m['body'].users['m'] == ['t']
  with pytest.raises(ValueError, match='ENTRY'):
    hlo.parse('HloModule m\n')


def test_one_trip_count_rule():
  m = hlo.parse(HLO)
  loops = m['main'].instrs
  assert m.trip_count(loops['known']) == 3       # known_trip_count first
  assert m.trip_count(loops['by_cond']) == 5     # then the condition's constant
  assert m.trip_count(loops['unknown']) is None  # else once, and listed
  assert m.unknown_loops() == ['unknown']
  mult = m.multiplicities()
  assert mult['body'] == 3 + 5 + 1 and mult['cond'] == 3 + 5 and mult['cond_unknown'] == 1
  assert mult['add'] == 2                        # the reduce's and the all-reduce's combiner
  assert 'add' not in m.multiplicities(control_flow_only=True)


def test_readers_share_the_rule():
  w = hlo_cost.walk(HLO, ())
  # the body's multiply (3 + 5 + 1 runs), the condition's compare (3 + 5 runs), the reduce
  assert w.elementwise['other'] == (3 + 5 + 1) * 32 + (3 + 5) + 32
  assert w.unknown_trip_counts == 1
  coll = comm.collective_bytes(HLO)
  assert coll['all_reduce'] == 4 * 8 * 4 and coll['unknown_trip_count'] == ['unknown']


def test_kernel_count_follows_control_flow_and_trip_counts():
  m = hlo.parse(HLO)
  # entry: the reduce and the all-reduce (parameters, the tuple and the whiles launch nothing);
  # body: its multiply, 3 + 5 + 1 runs; cond: its compare, 3 + 5 runs; cond_unknown: a constant only;
  # the reduce's combiner `add` is part of the reduce's kernel
  assert hlo.kernel_counts(m) == {'reduce': 1, 'all-reduce': 1, 'multiply': 9, 'compare': 8}
  assert hlo.kernel_count(m) == 19


KERNELS_HLO = """HloModule k

%fused (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %n = f32[4,8]{1,0} negate(%p0)
  ROOT %t = f32[8,4]{1,0} transpose(%n), dimensions={1,0}
}

%fused_id (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[4,8]{1,0} transpose(%p0), dimensions={0,1}
}

ENTRY %main (a: f32[4,8]) -> (f32[8,4], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %c = f32[] constant(1)
  %b = f32[32]{0} bitcast(%a)
  %f = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused
  %g = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_id
  %cp = f32[4,8]{0,1} copy(%a)
  %cc = f32[4,8]{1,0} custom-call(%a), custom_call_target="foo"
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%a), dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %tr = f32[8,4]{1,0} transpose(%a), dimensions={1,0}
  ROOT %out = (f32[8,4]{1,0}, f32[4,8]{1,0}) tuple(%f, %g)
}
"""


def test_kernel_count_which_opcodes_launch():
  m = hlo.parse(KERNELS_HLO)
  # two fusions, a copy, a custom-call, the async all-gather once (at its start), a transpose;
  # not the parameter, the constant, the bitcast, the -done, the tuple, nor inside the fusions
  assert hlo.kernel_counts(m) == {'fusion': 2, 'copy': 1, 'custom-call': 1, 'all-gather-start': 1, 'transpose': 1}
  main = m['main'].instrs
  assert [n for n in main if hlo.transposes(m, main[n])] == ['f', 'tr']   # %g's permutation is the identity


# The TPU compiler's forms of a decode step's dots (one token per device; excerpts of the optimized HLO
# of `litejax bound --decode --target v5p:2x2x1` on configs/tiny.yaml): a one-row projection as
# multiply + reduce, only the reduce naming the dot; the attention's grouped QK^T as a convolution whose
# lhs dilation makes half its window taps holes.
TPU_DOTS = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%proj (p0: f32[128,4,32], p1: f32[128]) -> f32[4,32] {
  %p1 = f32[128]{0:T(128)S(1)} parameter(1)
  %b = f32[128,4,32]{0,2,1:T(8,128)} broadcast(%p1), dimensions={0}, metadata={op_name="jit(step)/attention_proj/bsd,dhk->bshk/dot_general"}
  %p0 = f32[128,4,32]{0,2,1:T(8,128)S(1)} parameter(0)
  %m = f32[128,4,32]{0,2,1:T(8,128)} multiply(%b, %p0)
  %z = f32[]{:T(128)} constant(0)
  ROOT %r = f32[4,32]{1,0:T(4,128)S(1)} reduce(%m, %z), dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/attention_proj/bsd,dhk->bshk/dot_general"}
}

%scores (k: f32[128,2,32], q: bf16[2,2,32]) -> f32[2,128,2] {
  %k = f32[128,2,32]{0,2,1:T(8,128)} parameter(0)
  %q = bf16[2,2,32]{2,1,0:T(2,128)(2,1)} parameter(1)
  ROOT %c = f32[2,128,2]{1,2,0:T(2,128)} convolution(%k, %q), window={size=2 lhs_dilate=2}, dim_labels=b0f_0oi->0bf, metadata={op_name="jit(step)/attention_scores/bsngk,btnk->bngst/dot_general"}
}

ENTRY %main (w: f32[128,4,32], x: f32[128], k: f32[128,2,32], q: bf16[2,2,32]) -> (f32[4,32], f32[2,128,2]) {
  %w = f32[128,4,32]{0,2,1} parameter(0)
  %x = f32[128]{0} parameter(1)
  %k = f32[128,2,32]{0,2,1} parameter(2)
  %q = bf16[2,2,32]{2,1,0} parameter(3)
  %f = f32[4,32]{1,0} fusion(%w, %x), kind=kLoop, calls=%proj, metadata={op_name="jit(step)/attention_proj/bsd,dhk->bshk/dot_general"}
  %g = f32[2,128,2]{1,2,0} fusion(%k, %q), kind=kOutput, calls=%scores, metadata={op_name="jit(step)/attention_scores/bsngk,btnk->bngst/dot_general"}
  ROOT %t = (f32[4,32]{1,0}, f32[2,128,2]{1,2,0}) tuple(%f, %g)
}
"""


def test_tpu_lowered_dots_are_matmul_work_at_the_dots_flops():
  m = hlo.parse(TPU_DOTS)
  conv = m['scores'].instrs['c']
  assert conv.attr('dim_labels') == 'b0f_0oi->0bf'
  # [S=128] x [KV=2 groups] x [2 heads] x [hd=32]: 2·128·2·2·32, the taps on dilation holes not counted
  assert hlo_cost.conv_flops(conv, m['scores']) == 2 * 128 * 2 * 2 * 32
  w = hlo_cost.walk(m, ('attention_proj', 'attention_scores'))
  assert w.flops == {'attention_proj': 2 * 128 * 4 * 32, 'attention_scores': 2 * 128 * 2 * 2 * 32}
  assert w.elementwise_flops == 0


def test_conv_flops_counts_padding_and_strides_out():
  # a 1-D convolution of 8 positions by a 3-tap kernel, pad 1 each side, stride 2: outputs 0..3 read
  # taps at -1..1, 1..3, 3..5, 5..7: 11 of the 12 pairs land on the input (position -1 is padding)
  text = """HloModule m
ENTRY %e (x: f32[1,8,4], w: f32[3,4,6]) -> f32[1,4,6] {
  %x = f32[1,8,4]{2,1,0} parameter(0)
  %w = f32[3,4,6]{2,1,0} parameter(1)
  ROOT %c = f32[1,4,6]{2,1,0} convolution(%x, %w), window={size=3 stride=2 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""
  m = hlo.parse(text)
  assert hlo_cost.conv_flops(m[m.entry].instrs['c'], m[m.entry]) == 2 * 4 * 6 * 1 * 11
