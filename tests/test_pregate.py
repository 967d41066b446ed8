"""Pre-gated routing (moe.pregate = D): MoE layer l routes the router input of MoE layer l - D (the first D
route their own), scanned and unscanned, on every dispatch path, with TierSet masks and selection biases,
against a float64 NumPy forward of the FFN halves; finite-difference gradients through the carried input;
the same forward on an expert-parallel mesh; the sparse expert update equal to the dense one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litejax import sharding
from litejax.config import MeshConfig, from_dict
from litejax.model.moe import routing
from litejax.model.transformer import init_model, layer_mean
from reference import dense_moe, hierarchical_route
from train_helpers import enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()   # the sparse-update test trains

BASE = {'model': dict(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, seq_len=8, vocab_size=64, d_ff=48),
        'moe': dict(num_tiers=2, groups_per_tier=2, experts_per_group=2, k_tier=1, k_group=1, k_expert=2,
                    d_expert=16, capacity_factor=8.0)}


def config(model=(), moe=()):
  raw = {k: dict(v) for k, v in BASE.items()}
  raw['model'].update(dict(model))
  raw['moe'].update(dict(moe))
  return from_dict(raw)


def tokens(cfg, b=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, cfg.model.seq_len), 0, cfg.model.vocab_size)


def blocks(model):
  """Every layer as a one-layer Block with concrete weights (a scanned model's layers sliced out)."""
  mc = model.cfg.model
  if not mc.scan_layers:
    return list(model.blocks)
  period = max(mc.moe_every, 1)
  out = []
  for i in range(mc.num_layers):
    graphdef, state = nnx.split(model.periods.layers[i % period])
    out.append(nnx.merge(graphdef, jax.tree.map(lambda a, p=i // period: a[p], state)))
  return out


def f64(x):
  return np.asarray(x, np.float64)


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * f64(scale)


def reference_forward(model, tok, tier_mask=None):
  """(logits [B, S, V], per MoE layer (experts [N, K], the float64 router input it routed)): attention from
  the model's own Block (f32, fed the reference's stream), every FFN half and the head in float64 NumPy,
  MoE layer j routing the router input of MoE layer j - D (its own for j < D)."""
  cfg = model.cfg
  mc, m = cfg.model, cfg.moe
  b, s = tok.shape
  x = f64(model.embed[...])[np.asarray(tok)]
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  inputs, routed = [], []
  for blk in blocks(model):
    x = f64(blk.attention(jnp.asarray(x, jnp.float32), pos)[0])
    h = rms_norm(x, blk.ffn_norm.scale[...], mc.norm_eps).reshape(b * s, -1)
    if not blk.is_moe:
      w = {k: f64(getattr(blk.ffn, k)[...]) for k in ('w_in', 'w_gate', 'w_out') if hasattr(blk.ffn, k)}
      gate = h @ w['w_gate']
      x = x + ((gate / (1 + np.exp(-gate)) * (h @ w['w_in'])) @ w['w_out']).reshape(x.shape)
      continue
    inputs.append(h)
    j = len(inputs) - 1
    router_in = inputs[j - m.pregate] if j >= m.pregate else h
    ffn = blk.ffn
    params = {k: f64(v) for k, v in ffn.router_params().items()}
    bias = None if ffn.router_bias() is None else {k: f64(v) for k, v in ffn.router_bias().items()}
    e_nk, w_nk = hierarchical_route(router_in, params, m.num_tiers, m.groups_per_tier, m.experts_per_group,
                                    m.k_tier, m.k_group, m.k_expert, m.score, m.renormalize, bias, tier_mask)
    experts = {k: f64(v) for k, v in ffn.expert_params().items()}
    y = dense_moe(h, e_nk, w_nk, np.ones_like(e_nk, bool), experts, m.expert_kind)
    x = x + y.reshape(x.shape)
    routed.append((e_nk, router_in))
  xf = rms_norm(x, model.final_norm.scale[...], mc.norm_eps)
  return xf @ f64(model.output_weights()), routed


CASES = {
    'unscanned-capacity-tiermask-D2': (dict(), dict(pregate=2, dispatch='capacity'), [False, True]),
    'scanned-every2-gather-sigmoid-bias-D1': (dict(scan_layers=True, moe_every=2),
                                              dict(pregate=1, dispatch='gather', score='sigmoid'), None),
    'unscanned-dropless-glu-D1': (dict(), dict(pregate=1, dispatch='dropless', expert_kind='glu'), None),
    'scanned-einsum-D3': (dict(scan_layers=True), dict(pregate=3, dispatch='einsum'), None),
}


@pytest.mark.parametrize('case', list(CASES))
def test_forward_routes_the_input_of_the_moe_layer_d_earlier(case):
  model_sets, moe_sets, mask = CASES[case]
  cfg = config(model_sets, moe_sets)
  model = init_model(cfg, seed=1)
  rng = np.random.default_rng(0)
  for ffn in model.moe_blocks():
    if hasattr(ffn, 'bias_expert'):   # selection biases that change choices
      for name in ('bias_tier', 'bias_group', 'bias_expert'):
        var = getattr(ffn, name)
        var[...] = jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32)
  tok = tokens(cfg)
  mask_j = None if mask is None else jnp.asarray(mask)
  logits, stats = nnx.jit(lambda m, t, k: m(t, k))(model, tok, mask_j)
  want, routed = reference_forward(model, tok, None if mask is None else np.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits), want, rtol=2e-4, atol=2e-4)
  assert len(routed) == cfg.model.num_moe_layers
  for j, (e_nk, router_in) in enumerate(routed):
    counts = np.bincount(e_nk.reshape(-1), minlength=cfg.moe.experts_total)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert[j]), counts)
    # the Switch and z losses are those of the routed input
    r = routing.route(jnp.asarray(router_in, jnp.float32), *_router(model, j), tier_mask=mask_j)
    np.testing.assert_allclose(np.asarray(stats.load_balance_loss[j]), np.asarray(r.load_balance_loss), rtol=1e-4)
    np.testing.assert_allclose(float(stats.z_loss[j]), float(r.z_loss), rtol=1e-4)
  if mask is not None:
    assert int(np.asarray(stats.tokens_per_tier)[:, 0].sum()) == 0     # the masked tier never chosen


def _router(model, j):
  """(router params, MoE config, selection biases) of MoE layer j."""
  ffns = model.moe_blocks()
  ffn = ffns[0] if model.cfg.model.scan_layers else ffns[j]
  take = (lambda t: jax.tree.map(lambda a: a[j], t)) if model.cfg.model.scan_layers else (lambda t: t)  # noqa: E731
  bias = ffn.router_bias()
  return take(ffn.router_params()), model.cfg.moe, None if bias is None else take(bias)


def _loss(graphdef, rest, tok):
  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(tok)
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tok[..., None], -1)[..., 0])
    return ce + 0.01 * layer_mean(aux.load_balance_loss).sum() + 0.001 * layer_mean(aux.z_loss)
  return loss


def _leaf_index(params, *names) -> int:
  """Index among the leaves of `params` of the one whose path holds every name (e.g. 'blocks', 0, 'ffn_norm')."""
  paths = [[str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p] for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  hits = [i for i, p in enumerate(paths) if all(str(n) in p for n in names)]
  assert len(hits) == 1, hits
  return hits[0]


def test_gradients_through_the_carried_input_match_finite_differences():
  """Scanned, D = 1 (the router input rides in the scan's carry): MoE layer 1's router reads layer 0's
  router input, so layer 0's ffn_norm scale reaches the loss through layer 1's routing as well as its own
  experts; its gradient, and layer 1's router tables', match central differences of the loss."""
  cfg = config(dict(scan_layers=True), dict(pregate=1, expert_kind='glu'))
  graphdef, params, rest = nnx.split(init_model(cfg, seed=2), nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  value_and_grad = jax.jit(jax.value_and_grad(lambda ls: _loss(graphdef, rest, tokens(cfg))(jax.tree.unflatten(tree, ls))))
  loss = lambda ls: value_and_grad(ls)[0]   # noqa: E731  (one compiled program)
  grads = value_and_grad(leaves)[1]
  for name, layer in [('ffn_norm', 0), ('router_expert', 1), ('router_tier', 1)]:
    i = _leaf_index(params, 'periods', name)
    g, value = np.asarray(grads[i]), np.asarray(leaves[i], np.float32)
    for f in np.argsort(-np.abs(g[layer]).reshape(-1))[:2]:    # stacked [layers, ...]: layer's largest entries
      idx = (layer,) + np.unravel_index(f, g[layer].shape)
      eps, fd = 1e-2, 0.0
      for sign in (1, -1):
        moved = value.copy()
        moved[idx] += sign * eps
        fd += sign * float(loss(leaves[:i] + [jnp.asarray(moved)] + leaves[i + 1:])) / (2 * eps)
      np.testing.assert_allclose(float(g[idx]), fd, rtol=3e-2, atol=1e-4, err_msg=f'{name} {idx}')


def _mesh(shape):
  return sharding.make_mesh(MeshConfig(*shape), devices=jax.devices()[:int(np.prod(shape))])


def _program(cfg, mesh):
  """The jitted loss of `cfg`'s model on 8 sequences compiled for `mesh` from abstract state, and its state
  shardings."""
  from litejax.train import step as train_step
  graphdef, abstract, shardings = train_step.state_layout(cfg, mesh)
  tok = jax.ShapeDtypeStruct((8, cfg.model.seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
  f = jax.jit(lambda p, r, t: _loss(graphdef, r, t)(p))
  with jax.set_mesh(mesh):
    return f.lower(abstract['params'], abstract['extra'], tok).compile(), shardings


def _loss_on(cfg, mesh, model):
  """(the loss of `model` on `mesh`, the compiled program)."""
  compiled, shardings = _program(cfg, mesh)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = jax.device_put((params, rest), (shardings['params'], shardings['extra']))
  with jax.set_mesh(mesh):
    return float(compiled(params, rest, jax.device_put(tokens(cfg, b=8), sharding.batch_sharding(mesh)))), compiled


def test_expert_parallel_equals_one_device_and_moves_what_unpregated_moves():
  """Scanned, D = 1, on the (2, 2, 1) mesh (experts over 2 ranks, gather dispatch, router_expert split by
  group over the expert ranks): the loss (router losses included) equals one device's, and the collectives
  move exactly the bytes of the same model without pre-gating: the carried router input rides with its
  tokens. (Gradients through the carry: the finite-difference test above.)"""
  from litejax.hlo import collectives
  moe = dict(dispatch='gather', capacity_factor=8.0)
  cfg = config(dict(scan_layers=True, num_layers=2), dict(moe, pregate=1))
  model = init_model(cfg, seed=3)
  mesh = _mesh((2, 2, 1))
  assert sharding.router_expert_split(cfg.moe, 2)
  loss, compiled = _loss_on(cfg, mesh, model)
  np.testing.assert_allclose(loss, _loss_on(cfg, _mesh((1, 1, 1)), model)[0], rtol=1e-5)
  moved = collectives.collective_bytes(compiled)
  plain = collectives.collective_bytes(_program(config(dict(scan_layers=True, num_layers=2), moe), mesh)[0])
  assert moved['all_to_all'] > 0
  assert {k: moved[k] for k in collectives.KINDS} == {k: plain[k] for k in collectives.KINDS}


def test_sparse_expert_update_equals_the_dense_one():
  """D = 1 with the sparse expert update (deltas on the touched expert and router rows, litejax.train.sparse_step):
  with every expert touched, two steps equal dense AdamW's, so the carried router input reaches the touched
  rows' gradients as it reaches the dense ones."""
  from litejax.config import TrainConfig
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer
  base = config(dict(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2), dict(pregate=1, k_group=2))
  mesh = _mesh((1, 1, 1))
  tok = np.random.default_rng(0).integers(0, 64, (4, base.model.seq_len + 1), dtype=np.int32)
  got = {}
  for update in ('dense', 'sparse'):
    cfg = base.replace(train=TrainConfig(lr=1e-2, warmup_steps=1, batch_size=4, expert_update=update))
    tx = make_optimizer(cfg.train)
    graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
    state = train_step.init_state(cfg, mesh, tx, shardings)
    step = train_step.make_train_step(cfg, graphdef, tx, shardings, sharding.batch_sharding(mesh))
    for _ in range(2):
      with jax.set_mesh(mesh):
        state, metrics = step(state, tok[:, :-1], tok[:, 1:])
      assert (np.asarray(metrics['tokens_per_expert']) > 0).all()     # the premise: every expert touched
    got[update] = (float(metrics['loss']), jax.device_get(state['params']))
  assert got['dense'][0] == pytest.approx(got['sparse'][0], rel=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got['sparse'][1]), jax.tree.leaves(got['dense'][1]),
                          strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('mode', ['forward', '--train', '--decode'])
def test_bound_holds_with_router_flops_unchanged(mode, capsys):
  """`litejax bound` on configs/tiny_hier.yaml shrunk (hierarchical routing, scanned), D = 1: the compiled
  FLOPs match the analytic bound, whose router terms are the unpregated model's (each MoE layer still
  runs its own router once), every router level at ratio 1."""
  import json

  from litejax import cli
  from litejax.model import bounds
  sets = ['model.d_model=32', 'model.seq_len=32', 'model.num_heads=2', 'model.d_ff=0', 'moe.d_expert=16',
          'moe.d_shared=0', 'model.scan_layers=true', 'mesh.data=1']
  args = ['bound', '--config', 'configs/tiny_hier.yaml', '--devices', '1', '--json'] + ([mode] if mode != 'forward' else [])
  assert cli.main(args + [a for o in sets + ['moe.pregate=1'] for a in ('--set', o)]) == 0
  rep = json.loads(capsys.readouterr().out)
  assert rep['violations'] == [] and 0.97 <= rep['ratio'] <= 1.03
  routers = {k: v for k, v in rep['by_component'].items() if k.startswith('router_')}
  assert set(routers) == {'router_tier', 'router_group', 'router_expert'}
  for name, row in routers.items():
    assert row['compiled'] == pytest.approx(row['analytic'], rel=1e-6), name
  from litejax.config import load_config
  plain, pregated = (load_config('configs/tiny_hier.yaml', sets + more) for more in ([], ['moe.pregate=1']))
  assert bounds.forward_flops_per_token(plain) == bounds.forward_flops_per_token(pregated)
