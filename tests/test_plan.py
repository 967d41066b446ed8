"""`litejax plan`: the smallest slice where a config fits, checked against a hand computation."""
import pytest

from litejax.perf import chips as hardware
from litejax.analysis import targets
from litejax.analysis import footprint, planning
from litejax.config import load_config
from test_targets import HUGE, SMALL

needs_libtpu = pytest.mark.skipif(targets.libtpu_version() is None,
                                  reason="libtpu not installed (pip install 'litejax[tpu]')")


def test_state_bytes_by_hand():
  # HUGE: 12800 experts x 3 x 512 x 1024 f32 = 80.53 GB of experts, split over the 8 expert ranks.
  cfg = load_config('configs/tiny.yaml', HUGE)
  s = footprint.state_bytes_per_device(cfg, {'data': 1, 'expert': 8, 'tensor': 1}, train=False)
  experts = 12800 * 3 * 512 * 1024 * 4
  assert experts / 8 < s['params'] < experts / 8 * 1.01
  t = footprint.state_bytes_per_device(cfg, {'data': 1, 'expert': 8, 'tensor': 1}, train=True)
  assert t['state'] == pytest.approx(3 * s['params'])


@needs_libtpu
def test_plan_finds_the_hand_computed_slice():
  # Forward on v5e (16 GB per chip): 80.5 GB of experts is 20.1 GB per chip on 2x2 (does not fit),
  # 10.1 GB on 2x4 (fits): the answer is v5e:2x4.
  out = planning.smallest_slice(load_config('configs/tiny.yaml', HUGE), 'v5e', train=False)
  assert out['answer'] == 'v5e:2x4'
  assert [r['verdict'] for r in out['tried']] == ['does not fit', 'fits']
  assert out['per_chip']['latency']['total_s'] > 0


@needs_libtpu
def test_plan_small_training_step_fits_smallest_slice():
  out = planning.smallest_slice(load_config('configs/tiny.yaml', SMALL), 'v5p', train=True)
  assert out['answer'] == 'v5p:' + hardware.SLICES['v5p'][0]


def test_plan_reports_shortfall_without_compiling():
  # The quadrillion config's state overflows every v5p slice already in the sharding arithmetic.
  out = planning.smallest_slice(load_config('configs/quadrillion.yaml'), 'v5p', train=True)
  assert out['answer'] is None
  assert out['shortfall']['state_over_pod_hbm'] > 1
  assert all(r['verdict'] in ('does not fit', 'mesh does not divide') for r in out['tried'])


def test_serve_plan_by_hand():
  """plan --serve on the quadrillion config: every byte figure and the chosen slice by hand."""
  from litejax.model import bounds
  cfg = load_config('configs/quadrillion.yaml')
  p = bounds.param_counts(cfg)
  experts, rest = 2 * p.expert_total, 2 * (p.total - p.expert_total)
  kv = 2 * 128 * 1 * 2048 * 8 * (2048 // 16) * 2
  hr = {'device': 0.5, 'device_or_host': 0.9}
  out = planning.serve_plan(cfg, 'v5p', hit_rates=hr)
  b = out['bytes']
  assert b['experts'] == experts and b['non_expert'] == rest and b['kv_cache'] == kv
  assert b['device_total'] == pytest.approx(rest + 0.01 * experts + kv)
  assert b['host_total'] == pytest.approx(0.1 * experts)
  ram, hbm = hardware.SERVE_HOST['v5p']['host_ram_bytes'], hardware.chip('v5p').hbm_bytes
  fits = [r for r in out['tried'] if r['hbm_bytes_per_chip'] <= hbm and r['host_bytes_per_chip'] <= ram]
  assert out['answer'] == fits[0]['target'] == out['tried'][-1]['target']
  first = next(t for t in hardware.SLICES['v5p']
               if (rest + 0.01 * experts + kv) / _chips(t) <= hbm and 0.1 * experts / _chips(t) <= ram)
  assert out['answer'] == f'v5p:{first}'
  lat = out['latency']
  one = 2 * p.expert_active_per_token / (4 * 128)
  assert lat['io_disk_ms'] == pytest.approx(1e3 * 0.1 * 4 * 128 * one / hardware.SERVE_HOST['v5p']['disk_bytes_per_s'])
  assert lat['io_host_to_hbm_ms'] == pytest.approx(
      1e3 * 0.5 * 4 * 128 * one / hardware.SERVE_HOST['v5p']['host_to_hbm_bytes_per_s'])
  # every expert in host RAM: no slice serves it, and the answer says why
  small = planning.serve_plan(cfg, 'v5p', host_fraction=1.0)
  assert small['answer'] is None and 'host RAM' in small['why_none'] and 'latency' not in small
  with pytest.raises(ValueError, match='--generation: serving needs host RAM per chip'):
    planning.serve_plan(cfg, 'v5e')


def test_pregated_io_is_what_does_not_fit_under_the_layers_ahead():
  """moe.pregate = D: a layer's reads start when the MoE layer D earlier runs, on one link in issue order.
  4 MoE layers, 1 s of compute each, by hand: 0.5 s of reads per layer hide behind the next layer but the
  first (its own router's); 2 s per layer keep the link busy, hiding 3 s of compute's worth."""
  cfg = load_config('configs/tiny.yaml', ['moe.pregate=1'])
  assert planning.exposed_io_s(cfg, 4.0, 2.0) == pytest.approx(0.5)
  assert planning.exposed_io_s(cfg, 4.0, 8.0) == pytest.approx(5.0)
  assert planning.exposed_io_s(load_config('configs/tiny.yaml', ['moe.pregate=2']), 4.0, 8.0) == pytest.approx(5.0)
  assert planning.exposed_io_s(load_config('configs/tiny.yaml'), 4.0, 2.0) == 2.0     # not pre-gated: all of it
  hr = {'device': 0.5, 'device_or_host': 0.9, 'source': 'by hand'}
  plain = planning.serve_plan(load_config('configs/quadrillion.yaml'), 'v5p', hit_rates=hr)['latency']
  gated = planning.serve_plan(load_config('configs/quadrillion.yaml', ['moe.pregate=1']), 'v5p', hit_rates=hr)['latency']
  io = 1e-3 * (plain['io_host_to_hbm_ms'] + plain['io_disk_ms'])
  assert 'pregate' not in plain and gated['pregate'] == 1
  assert gated['io_exposed_ms'] == pytest.approx(
      1e3 * planning.exposed_io_s(load_config('configs/quadrillion.yaml', ['moe.pregate=1']), 1e-3 * plain['compute_ms'], io))
  assert gated['per_token_ms'] == pytest.approx(gated['compute_ms'] + gated['io_exposed_ms'])
  assert gated['io_exposed_ms'] + gated['io_overlapped_ms'] == pytest.approx(1e3 * io)


def test_plan_serve_says_a_pregated_models_io_overlaps(tmp_path, capsys):
  from litejax import cli
  bench = _bench(tmp_path / 'tiers.json')
  assert cli.main(['plan', '--config', 'quadrillion', '--generation', 'v5p', '--serve', '--set', 'moe.pregate=1',
                   '--hit-rates', str(bench)]) == 0
  out = capsys.readouterr().out
  assert 'the I/O that does not fit under it' in out and 'pre-gated (moe.pregate=1)' in out


def _chips(topo):
  import math
  return math.prod(int(x) for x in topo.split('x'))


def test_plan_serve_command_prints_the_slice(capsys):
  from litejax import cli
  rc = cli.main(['plan', '--config', 'configs/quadrillion.yaml', '--generation', 'v5p', '--serve'])
  out = capsys.readouterr().out
  assert rc == 0 and 'is the smallest v5p slice that serves this config' in out
  assert 'host RAM per chip assumed 112 GB' in out


def _bench(path, device=0.25, device_or_host=0.75):
  """A tiers benchmark JSON as experiments/bench_tiers.py writes it (the fields read_hit_rates reads)."""
  import json
  rows = [{'policy': p, 'device_fraction': f, 'device_hit_rate': device if (p, f) == ('lru', 0.01) else 0.0,
           'hit_rate_device_or_host': device_or_host if (p, f) == ('lru', 0.01) else 0.0}
          for p in ('lru', 'lfu') for f in (0.005, 0.01, 0.05)]
  path.write_text(json.dumps({'config': 'configs/tiny_1k.yaml', 'host_cache_fraction': 0.1, 'sim': rows}))
  return path


def test_plan_serve_hit_rates_come_from_the_flag_from_any_folder(tmp_path, monkeypatch, capsys):
  """--hit-rates PATH prices the I/O term and the output names the file; without it, from a folder that is
  no checkout, the output says there is no I/O term (nothing is read relative to the source tree)."""
  import json

  from litejax import cli
  monkeypatch.chdir(tmp_path)
  serve = ['plan', '--config', 'quadrillion', '--generation', 'v5p', '--serve']
  assert cli.main(serve) == 0
  assert 'no I/O term: no --hit-rates given' in capsys.readouterr().out
  assert cli.main(serve + ['--json']) == 0
  assert 'latency' not in json.loads(capsys.readouterr().out)
  _bench(tmp_path / 'tiers.json')
  assert cli.main(serve + ['--hit-rates', 'tiers.json']) == 0
  out = capsys.readouterr().out
  assert ('(hit rates device 0.250, device or host 0.750: tiers.json (lru, 1% device slots, 10% host cache, '
          'decode trace of configs/tiny_1k.yaml))') in out
  assert cli.main(serve + ['--hit-rates', 'tiers.json', '--json']) == 0
  lat = json.loads(capsys.readouterr().out)['latency']
  want = planning.serve_plan(load_config('quadrillion'), 'v5p',
                             hit_rates={'device': 0.25, 'device_or_host': 0.75})['latency']
  assert lat['hit_rates']['device'] == 0.25 and lat['per_token_ms'] == pytest.approx(want['per_token_ms'])


@pytest.mark.parametrize('argv, words', [
    (['--serve', '--hit-rates', 'missing.json'], '--hit-rates missing.json: no such file'),
    (['--serve', '--hit-rates', 'notes.txt'], '--hit-rates notes.txt: not a tiers benchmark JSON'),
    (['--serve', '--hit-rates', 'empty.json'], '--hit-rates empty.json: no lru row at 1% device slots'),
    (['--hit-rates', 'empty.json'], '--hit-rates: prices the I/O term of --serve'),
])
def test_plan_bad_hit_rates_are_one_line(tmp_path, monkeypatch, capsys, argv, words):
  from litejax import cli
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'notes.txt').write_text('not json\n')
  (tmp_path / 'empty.json').write_text('{"sim": []}')
  assert cli.main(['plan', '--config', 'quadrillion', '--generation', 'v5p'] + argv) == 2
  err = capsys.readouterr().err
  assert words in err and len(err.strip().splitlines()) == 1


def test_train_state_honours_expert_update_and_optimizer():
  """tiny (flat router: only the expert tables are row tables), one device: the state's differences
  between the three choices are the expert tables' row state, by hand."""
  from litejax.train import row_optim as sparse_optim
  sizes = {'data': 1, 'expert': 1, 'tensor': 1}
  state = {}
  for update, opt in planning.OPTIMIZER_CHOICES:
    cfg = load_config('configs/tiny.yaml', [f'train.expert_update={update}', f'train.expert_optimizer={opt}'])
    state[update, opt] = footprint.state_bytes_per_device(cfg, sizes, train=True)
    assert (state[update, opt]['expert_update'], state[update, opt]['expert_optimizer']) == (update, opt)
  layers, experts, d, h = 4, 16, 128, 32   # configs/tiny.yaml: GLU experts, f32
  # sparse AdamW = dense AdamW (f32 moments either way) + an int32 count per row of each of 3 tables
  assert state['sparse', 'adamw']['state'] - state['dense', 'adamw']['state'] == layers * 3 * experts * 4
  # factored replaces the two d x h moments of w_in, w_gate, w_out by (d + h) f32 statistics each
  per_expert = (sparse_optim.expert_state_bytes(d, h, 'adamw', glu=True, param_bytes=4)
                - sparse_optim.expert_state_bytes(d, h, 'factored', glu=True, param_bytes=4))
  assert per_expert == 3 * (2 * d * h * 4 - (d + h) * 4)
  assert state['sparse', 'adamw']['state'] - state['sparse', 'factored']['state'] == layers * experts * per_expert
  assert all(s['params'] == state['dense', 'adamw']['params'] for s in state.values())


def test_quadrillion_factored_plan_by_hand():
  """The quadrillion experts' training state per choice, and the host tier beyond a whole pod's HBM."""
  from litejax.model import bounds
  cfg = load_config('configs/quadrillion.yaml', ['train.expert_optimizer=factored'])
  out = planning.smallest_slice(cfg, 'v5p', train=True)
  d, h, experts = 2048, 1953, 128 * 16 * 128 * 480          # bf16 MLP experts, 983,040 per layer
  assert out['answer'] is None and out['train_state']['expert_optimizer'] == 'factored'
  opts = {(o['expert_update'], o['expert_optimizer']): o for o in out['train_state_options']}
  # per expert, w_in [d, h] and w_out [h, d]: bf16 params; adamw 2 f32 moments + count; factored (d + h) f32 + count
  assert opts['sparse', 'factored']['expert_state_bytes_total'] == experts * 2 * (2 * d * h + 4 * (d + h) + 4)
  assert opts['sparse', 'adamw']['expert_state_bytes_total'] == experts * 2 * (10 * d * h + 4)
  assert opts['dense', 'adamw']['expert_state_bytes_total'] == 3 * 2 * bounds.param_counts(cfg).expert_total
  assert opts['sparse', 'factored']['expert_state_bytes_total'] == pytest.approx(2.017e15, rel=1e-3)
  assert opts['sparse', 'adamw']['expert_state_bytes_total'] == pytest.approx(10.07e15, rel=1e-3)
  assert [o['chosen'] for o in out['train_state_options']] == [False, False, True]
  total = out['train_state']['state_total_all_chips']
  assert total == opts['sparse', 'factored']['state_bytes_total']
  # the whole state: the experts' plus the rest (dense parameters, optax AdamW, router rows), a small part
  assert 0 < total - opts['sparse', 'factored']['expert_state_bytes_total'] < 0.001 * total
  hbm, chips, ram = 95 * 2 ** 30, 8960, 112e9
  assert opts['sparse', 'factored']['chips_needed_if_fully_sharded'] == -(-total // hbm)
  assert opts['sparse', 'factored']['bytes_per_chip_on_pod_if_fully_sharded'] == pytest.approx(total / chips)
  tier = out['shortfall']['host_tier']
  assert tier['host_must_hold_bytes'] == pytest.approx(total - chips * hbm)
  assert tier['need_over_host_ram'] == pytest.approx((total - chips * hbm) / chips / ram)
  assert tier['state_over_pod_hbm_plus_host'] == pytest.approx(total / (chips * (hbm + ram)))
  assert tier['chips_needed_hbm_plus_host'] == -(-total // (hbm + ram))
  # a pod's HBM + host RAM hold 0.95x of it: short, and by how much is printed
  assert 1.0 < tier['state_over_pod_hbm_plus_host'] < 1.1


def test_plan_command_prints_the_training_state(capsys):
  from litejax import cli
  rc = cli.main(['plan', '--config', 'configs/quadrillion.yaml', '--generation', 'v5p',
                 '--set', 'train.expert_optimizer=factored'])
  out = capsys.readouterr().out
  assert rc == 1
  assert 'training state: expert update sparse, expert optimizer factored: 2.02 PB' in out
  assert 'sparse factored state 2.02 PB' in out and 'sparse adamw    state 10.1 PB' in out
  assert '225 GB per chip on a whole pod = 2.21x HBM' in out
  assert 'next tier, host memory (112 GB per chip' in out and '123 GB per chip' in out


QUAD_EXPERT_ONLY = ['mesh.data=1', 'mesh.expert=-1', 'train.expert_optimizer=factored']
ROUTER_EXPERT_F32 = 128 * 2048 * 2048 * 480 * 4   # quadrillion router_expert [L, T·G, d, E_g], kept in f32


@pytest.mark.parametrize('expert_ranks', [2048, 4096])
def test_footprint_shards_router_expert_as_training_does(expert_ranks):
  """router_expert splits over the expert ranks when they divide the T·G = 2,048 groups and is replicated
  otherwise (sharding.groups_shard), forward and training alike: no mesh raises that training accepts."""
  cfg = load_config('configs/quadrillion.yaml', QUAD_EXPERT_ONLY)
  sizes = {'data': 1, 'expert': expert_ranks, 'tensor': 1}
  fwd = footprint.state_bytes_per_device(cfg, sizes, train=False)
  train = footprint.state_bytes_per_device(cfg, sizes, train=True)
  share = ROUTER_EXPERT_F32 / expert_ranks if expert_ranks == 2048 else ROUTER_EXPERT_F32
  assert fwd['state_by_table']['router_expert'] == share
  # factored row state of a [d, E_g] row: (d + E_g) f32 statistics + an int32 count, sharded like the table
  rows = 128 * 2048 * ((2048 + 480) * 4 + 4)
  assert train['state_by_table']['router_expert'] == share + rows * share / ROUTER_EXPERT_F32
  assert fwd['params'] == train['params'] == sum(fwd['state_by_table'].values())


def test_plan_command_on_an_expert_only_mesh(capsys):
  """The shortfall names the largest slice whose mesh divides the config (16x20x28's 8,960 chips do not
  divide 983,040 experts) and the least short one, where router_expert shards with its groups."""
  from litejax import cli
  rc = cli.main(['plan', '--config', 'configs/quadrillion.yaml', '--generation', 'v5p']
                + [a for o in QUAD_EXPERT_ONLY for a in ('--set', o)])
  out = capsys.readouterr().out
  assert rc == 1
  assert "largest slice whose mesh divides the config, v5p:16x16x24: needs 13.5x a chip's HBM" in out
  assert 'router_expert 1.03 TB' in out and '(not dividing: v5p:16x20x28)' in out
  assert "least short: v5p:8x16x16, 9.79x a chip's HBM" in out and 'router_expert 505 MB' in out
  cfg = load_config('configs/quadrillion.yaml', QUAD_EXPERT_ONLY)
  s = planning.smallest_slice(cfg, 'v5p', train=True)['shortfall']
  assert s['state_by_table_per_chip_on_largest_slice']['router_expert'] > ROUTER_EXPERT_F32   # replicated
  assert ROUTER_EXPERT_F32 / 2048 < s['state_by_table_per_chip_on_least_short_slice']['router_expert'] \
      < 1.01 * ROUTER_EXPERT_F32 / 2048


@pytest.mark.slow
@needs_libtpu
def test_plan_counts_a_compiler_refusal_as_does_not_fit():
  """A step whose buffers the TPU compiler refuses (here the 65,536² attention scores) is a 'does not fit'
  verdict with the compiler's figures, not a traceback: the mesh (tensor over every chip) divides only v5e:2x2."""
  cfg = load_config('configs/tiny.yaml', ['model.num_layers=1', 'model.seq_len=65536', 'model.num_kv_heads=4', 'mesh.data=1',
                                         'mesh.tensor=-1'])
  out = planning.smallest_slice(cfg, 'v5e', train=False)
  refused = [r for r in out['tried'] if r.get('by') == 'compiler refused']
  assert out['answer'] is None and [r['target'] for r in refused] == ['v5e:2x2']
  assert refused[0]['verdict'] == 'does not fit' and refused[0]['need_over_hbm'] > 1
  assert 'per device' in refused[0]['compiler_refused'] and out['shortfall']['least_short_slice'] == 'v5e:2x2'
