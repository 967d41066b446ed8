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
