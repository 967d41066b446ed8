"""Imported Mixtral and Qwen3-MoE models compute what transformers computes (tests/fixtures/hf: transformers'
own logits, router choices, greedy tokens and eval loss, experiments/hf_fixtures.py): the full forward and
prefill + decode within 1e-4 in float32 and the same top-k experts per layer, on one device and on expert- and
tensor-parallel meshes; the store runtime, eval and train --resume from an imported folder."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from hf_helpers import EVAL_TEXT, FIXTURES, TOL, assert_same_experts, prompts, reference
from litejax import cli
from litejax.hf.importer import import_hf
from litejax.inference import decode, session as sessions
from litejax.model import kv_cache
from litejax.model.transformer import abstract_model

pytestmark = pytest.mark.slow

NEW_TOKENS = 6
# (family, mesh overrides, devices, what runs): the forward without a cache (training's and eval's), and the
# decoding runtime (prefill's logits and experts over whole prompts, teacher-forced decode steps, greedy
# tokens). One device each; Qwen3-MoE's 6 experts over 2 expert ranks with heads and expert hidden over 2
# tensor ranks; Mixtral's 5 experts over 5 expert ranks.
CASES = [('mixtral', [], 1, ('forward', 'decode')), ('qwen3_moe', [], 1, ('forward', 'decode')),
         ('qwen3_moe_tied', [], 1, ('forward',)),
         ('qwen3_moe', ['mesh.data=1', 'mesh.expert=2', 'mesh.tensor=2'], 4, ('decode',)),
         ('mixtral', ['mesh.data=1', 'mesh.expert=5', 'mesh.tensor=1'], 5, ('decode', 'forward')),
         ('deepseek_v3', [], 1, ('forward', 'decode')),
         ('deepseek_v3', ['mesh.data=1', 'mesh.expert=3', 'mesh.tensor=1'], 3, ('forward',))]


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('hf_parity')
  out = {}
  for name in ('mixtral', 'qwen3_moe', 'qwen3_moe_tied', 'deepseek_v3'):
    out[name] = tmp / name
    import_hf(FIXTURES / name / 'per_expert', out[name], seq_len=16)
  return out


def _padded(ref: dict, rows: int) -> tuple[np.ndarray, np.ndarray]:
  ps = prompts(ref)
  tokens = np.zeros((rows, max(len(p) for p in ps)), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i, p in enumerate(ps):
    tokens[i, :len(p)], lengths[i] = p, len(p)
  return tokens, lengths


def _forward(session, tokens_bs):
  """(logits [B, S, V], expert ids [MoE layers, B, S, K]) of the model's forward, routed as prefill (dropless)."""
  graphdef = nnx.split(abstract_model(decode.prefill_config(session.cfg)), nnx.Param, ...)[0]
  mesh = session.mesh

  @jax.jit
  def run(params, extra, t):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      logits, stats = nnx.merge(graphdef, params, extra)(t)
    return logits, stats.expert_ids.reshape(stats.expert_ids.shape[0], *t.shape, -1)

  from litejax import sharding as shd
  with jax.set_mesh(mesh):
    out = run(session.params, session.extra, jax.device_put(tokens_bs, shd.batch_sharding(mesh)))
  return jax.device_get(out)


def _runtime_checks(session, ref, name) -> None:
  """Through one decoding runtime that reports its routing: prefill over whole prompts (logits and experts at
  every position), greedy generation, and prefill over each prompt's first half followed by one decode step per
  remaining token, fed the prompt's own next token (logits at every position). Every program has the prompt
  batch's shapes, so each compiles once."""
  ps = prompts(ref)
  s = session.mesh.shape
  rows = -(-len(ps) // (s['data'] * s['expert'])) * s['data'] * s['expert']
  tokens, lens = _padded(ref, rows)
  rt = decode.make_runtime(session.cfg, session.mesh, rows, tokens.shape[1] + NEW_TOKENS, with_routing=True)
  params, extra = rt.place(session.params, session.extra)
  key, samp = rt.replicated((jax.random.key(0), decode.Sampling().as_arrays()))
  with jax.set_mesh(rt.mesh):
    cache = kv_cache.init_cache(rt.cfg, rt.mesh, rt.batch, rt.max_len)
    _, logits_bpv, _, experts = rt.prefill(params, extra, cache, tokens, rt.rows(lens), key, samp)
    logits_bpv, experts = np.asarray(logits_bpv), np.asarray(experts)
    for i, p in enumerate(ps):
      np.testing.assert_allclose(logits_bpv[i, :len(p)], ref[f'logits_{i}'], atol=TOL, rtol=0)
      assert_same_experts(name, experts[:, i, :len(p)], ref[f'experts_{i}'])
    gen = decode.generate(rt, params, extra, [p.tolist() for p in ps], NEW_TOKENS)
    assert gen.tokens == [ref[f'greedy_{i}'].tolist() for i in range(len(ps))]
    pre = np.maximum(lens // 2, 1)
    out = [[None] * int(n) for n in lens]
    cache = kv_cache.init_cache(rt.cfg, rt.mesh, rt.batch, rt.max_len)
    # the whole prompts go in, but only their first halves count: decode overwrites the cache from there
    _, logits_bpv, cache, _ = rt.prefill(params, extra, cache, tokens, rt.rows(pre), key, samp)
    for b in range(len(ps)):
      out[b][:pre[b]] = list(np.asarray(logits_bpv)[b, :pre[b]])
    for j in range(int((lens - pre).max())):
      pos = np.minimum(pre + j, tokens.shape[1] - 1)
      feed = tokens[np.arange(rows), pos]
      _, logits_bv, cache, _ = rt.step(params, extra, cache, rt.rows(feed), rt.rows(pos), key,
                                       rt.replicated(np.int32(j + 1)), samp)
      for b in range(len(ps)):
        if pre[b] + j < lens[b]:
          out[b][pre[b] + j] = np.asarray(logits_bv)[b]
  for i, got in enumerate(out[:len(ps)]):
    np.testing.assert_allclose(np.stack(got), ref[f'logits_{i}'], atol=TOL, rtol=0)


@pytest.mark.parametrize('name, overrides, devices, checks', CASES, ids=[f'{c[0]}-{c[2]}dev' for c in CASES])
def test_logits_and_experts_match_transformers(ckpts, name, overrides, devices, checks):
  session = sessions.load(ckpts[name], overrides, jax.devices()[:devices])
  ref = reference(name)
  if 'forward' in checks:
    ps = prompts(ref)
    s = session.mesh.shape
    logits, experts = _forward(session, _padded(ref, -(-len(ps) // (s['data'] * s['expert'])) * s['data'] * s['expert'])[0])
    assert experts.shape[0] == len(ref['moe_layers'])
    for i, p in enumerate(ps):
      np.testing.assert_allclose(logits[i, :len(p)], ref[f'logits_{i}'], atol=TOL, rtol=0)
      assert_same_experts(name, experts[:, i, :len(p)], ref[f'experts_{i}'])   # best first, as transformers'
  if 'decode' in checks:
    _runtime_checks(session, ref, name)


def test_eval_matches_transformers_loss(ckpts, tmp_path, capsys):
  ref = reference('qwen3_moe')
  assert cli.main(['eval', '--ckpt-dir', str(ckpts['qwen3_moe']), '--data', str(EVAL_TEXT), '--seq-len', '12',
                   '--batch', '4', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['tokens'] == int(ref['eval_tokens']) and out['tokenizer'] == 'hf'
  assert abs(out['loss'] - float(ref['eval_loss'])) < TOL and out['perplexity'] == pytest.approx(np.exp(out['loss']))
  # the same tokens as a .u32.bin file: the same windows, the same loss
  from litejax.train import tokenizer as tokenizers
  ids = tokenizers.for_checkpoint(ckpts['qwen3_moe']).encode(EVAL_TEXT.read_text())
  (tmp_path / 'eval.u32.bin').write_bytes(ids.astype(np.uint32).tobytes())
  assert cli.main(['eval', '--ckpt-dir', str(ckpts['qwen3_moe']), '--data', str(tmp_path / 'eval.u32.bin'),
                   '--seq-len', '12', '--batch', '4', '--json']) == 0
  again = json.loads(capsys.readouterr().out)
  assert again['tokens'] == out['tokens'] and again['windows'] == out['windows'] == -(-len(ids) // 12)
  assert again['loss'] == pytest.approx(out['loss'], abs=1e-6)


def test_store_import_decodes_as_transformers(tmp_path, capsys):
  """import-hf --store: the experts in the store, generate --store finds the checkpoint through its manifest."""
  ref = reference('mixtral')
  assert cli.main(['import-hf', str(FIXTURES / 'mixtral' / 'fused'), '--out', str(tmp_path / 'ckpt'),
                   '--store', str(tmp_path / 'store'), '--seq-len', '16']) == 0
  capsys.readouterr()
  assert cli.main(['generate', '--store', str(tmp_path / 'store'), '--prompt', str(ref['prompt_1']),
                   '--max-new-tokens', str(NEW_TOKENS), '--device-slots', '0.4', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['tokens'] == [ref['greedy_1'].tolist()]
  assert cli.main(['generate', '--ckpt-dir', str(tmp_path / 'ckpt'), '--prompt', 'a']) == 2
  assert 'decode with --store' in capsys.readouterr().err


def test_train_resumes_an_import(ckpts, tmp_path):
  """train --resume --ckpt-dir alone continues an imported folder (a fresh optimizer; then a whole training
  state is saved), on text tokenized with the imported tokenizer. --stop-after: no final eval to compile."""
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(ckpts['qwen3_moe_tied'], ckpt)
  assert cli.main(['train', '--ckpt-dir', str(ckpt), '--resume', '--steps', '2', '--stop-after', '1', '--devices', '1',
                   '--quiet', '--data', str(EVAL_TEXT), '--metrics', str(tmp_path / 'm.jsonl'),
                   '--set', 'train.batch_size=8', '--set', 'train.val_fraction=0.5', '--set', 'model.seq_len=8']) == 0
  from litejax.train.checkpoint import Checkpointer, holds_optimizer_state
  ck = Checkpointer(ckpt, read_only=True)
  assert ck.all_steps() == [0, 1] and holds_optimizer_state(ck.newest_meta()[1])
  ck.close()
