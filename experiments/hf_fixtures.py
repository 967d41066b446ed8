"""Reference fixtures for litejax's Hugging Face import and export (tests/test_hf.py), made by transformers itself.

  pip install '.[hf-reference]'      # torch and transformers (CPU wheels do), beside litejax
  python experiments/hf_fixtures.py                     # (re)writes tests/fixtures/hf/
  python experiments/hf_fixtures.py --check             # litejax import-hf -> export-hf -> transformers loads it
  python experiments/hf_fixtures.py --only deepseek_v3   # (re)writes (or --check-s) one fixture

Builds tiny random models of each family with transformers (odd shapes: head_dim != hidden/heads, several kv
heads, expert counts that are not powers of two, a dense layer through mlp_only_layers, a tied variant), a
tiny tokenizer.json (the `tokenizers` package, trained on the text below), and saves each model
  per_expert/  with save_pretrained (one tensor per expert, the published checkpoints' layout)
  fused/       as its state_dict through safetensors (transformers 5's fused [E, ...] expert tensors)
beside reference.npz: transformers' logits for prompts of several lengths, the expert ids its routers chose per
MoE layer, its greedy continuations, and its mean loss over the eval text's windows. Nothing in it comes from a
re-implementation: the numbers are transformers' forward passes.

--check runs litejax (`--litejax-python`, default this interpreter) to import each folder and export it again
in both layouts, loads every export with AutoModelForCausalLM.from_pretrained and compares its logits with the
recorded ones (and the two layouts' weights with each other); it prints one JSON object and exits 1 on a
mismatch.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / 'tests' / 'fixtures' / 'hf'
TOL = 1e-4

TEXT = """mixtures of experts route each token to a few experts and add what they return.
the router scores every expert, keeps the best two, and weighs their outputs by the scores.
a dense layer runs every weight for every token; a sparse layer runs only the chosen experts.
we check that the numbers match: the same logits, the same experts, the same next token.
small models with odd shapes find the mistakes that large ones hide.
"""
PROMPTS = ['a', 'the router scores every expert', 'small models with odd shapes find the mistakes that hide']
EVAL_SEQ_LEN = 12
GREEDY_TOKENS = 6
VOCAB = 96
# The reference formulas (transformers' CPU grouped-matmul experts refuse these odd shapes' strides).
EAGER = dict(attn_implementation='eager', experts_implementation='eager')

FIXTURES = {
    'mixtral': dict(arch='MixtralForCausalLM', layouts=('per_expert', 'fused'), config=dict(
        hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=6, num_local_experts=5, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=False)),
    'qwen3_moe': dict(arch='Qwen3MoeForCausalLM', layouts=('per_expert', 'fused'), config=dict(
        hidden_size=16, intermediate_size=20, moe_intermediate_size=10, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_experts=6, num_experts_per_tok=3,
        mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=False, rope_theta=1e4, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=False)),
    'qwen3_moe_tied': dict(arch='Qwen3MoeForCausalLM', layouts=('per_expert',), config=dict(
        hidden_size=16, intermediate_size=20, moe_intermediate_size=10, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, num_experts=3, num_experts_per_tok=2,
        decoder_sparse_step=2, norm_topk_prob=True, rope_theta=1e4, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=True)),
    # DeepSeek-V3: MLA with a q rank and YaRN (max_position_embeddings = factor x original, as the published
    # config has it), 12 experts in 4 groups keeping 2, 3 pooled, sigmoid scores with a random selection bias,
    # one shared expert, the first of 3 layers dense.
    'deepseek_v3': dict(arch='DeepseekV3ForCausalLM', layouts=('per_expert', 'fused'), config=dict(
        hidden_size=16, intermediate_size=20, moe_intermediate_size=6, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=10, kv_lora_rank=8, qk_nope_head_dim=6,
        qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
        max_position_embeddings=64, rope_parameters=dict(
            rope_type='yarn', rope_theta=1e4, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0), tie_word_embeddings=False),
        margin=1e-3),   # sigmoid scores in (0, 1): gaps of 1e-3 are 10^4 float32 roundings
}
# Families whose routers choose experts in no particular order (DeepSeek's torch.topk(sorted=False)): their
# recorded expert ids are sorted ascending, and compared as sets.
UNORDERED_EXPERTS = ('deepseek_v3',)


def _need(module: str):
  try:
    return __import__(module)
  except ImportError:
    sys.exit(f"hf_fixtures: needs {module}: pip install '.[hf-reference]' (torch and transformers)")


def build_tokenizer(path: pathlib.Path) -> None:
  """A BPE tokenizer.json of VOCAB tokens over lowercase text, adding <s> in front as Llama-style ones do."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  alphabet = list('abcdefghijklmnopqrstuvwxyz.,;:!?')
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<unk>', '<s>', '</s>'], initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(TEXT.splitlines(), trainer)
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
  tok.save(str(path))


def build_model(name: str, spec: dict, seed: int):
  """The transformers model with random weights large enough that every router's top-k is decisive."""
  torch = _need('torch')
  transformers = _need('transformers')
  cls = getattr(transformers, spec['arch'])
  config = cls.config_class(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **spec['config'], **EAGER)
  torch.manual_seed(seed)
  model = cls(config).eval()
  sigmoid = spec['arch'] == 'DeepseekV3ForCausalLM'
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith('norm.weight') or 'layernorm' in pname:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif pname.endswith('gate.weight'):
        # routers: decisive top-k (sigmoid scores: logits of a few units, away from its flat tails)
        p.copy_((0.4 if sigmoid else 1.0) * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
    for bname, b in model.named_buffers():
      if bname.endswith('e_score_correction_bias'):
        b.copy_(0.1 * torch.randn_like(b))   # the selection bias moves the choice, not the gates
  return model


def selection_margin(model, logits) -> float:
  """DeepSeek-V3: the smallest gap, over tokens, between the last kept and the first dropped group score and
  between the last chosen and the first unchosen selection score of the kept groups' experts."""
  import torch
  c = model.config
  gate = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, 'experts')][0]
  sel = logits.float().sigmoid() + gate.e_score_correction_bias
  groups = sel.view(-1, c.n_group, c.n_routed_experts // c.n_group)
  gs = groups.topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
  margin = float((gs[:, c.topk_group - 1] - gs[:, c.topk_group]).min())
  kept = groups.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
  pool = torch.gather(groups, 1, kept[..., None].expand(-1, -1, groups.shape[-1])).flatten(1)
  top = pool.sort(-1, descending=True).values
  k = c.num_experts_per_tok
  return min(margin, float((top[:, k - 1] - top[:, k]).min()))


def reference(model, tokenizer_path: pathlib.Path) -> dict:
  """transformers' own outputs: logits, chosen experts (its routers' returned indices), greedy tokens, eval loss."""
  import numpy as np
  import torch
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(tokenizer_path))
  routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, 'gate') and
             hasattr(layer.mlp, 'experts')]
  chosen: list = []
  router_logits: list = []

  def hook(module, inputs, outputs):
    chosen.append(outputs[2].detach().clone())
    router_logits.append(outputs[0].detach().clone())
  hooks = [r.register_forward_hook(hook) for r in routers]
  unordered = type(model).__name__ == 'DeepseekV3ForCausalLM'
  out = {'moe_layers': np.asarray([i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, 'experts')])}
  margins = []
  with torch.no_grad():
    for i, text in enumerate(PROMPTS):
      ids = torch.tensor([tok.encode(text).ids])
      chosen.clear()
      router_logits.clear()
      res = model(ids)
      out[f'prompt_{i}'] = np.asarray(text)
      out[f'tokens_{i}'] = ids[0].numpy().astype(np.int32)
      out[f'logits_{i}'] = res.logits[0].float().numpy()
      experts = torch.stack(chosen)                                           # [MoE layers, S, k]
      out[f'experts_{i}'] = (experts.sort(-1).values if unordered else experts).numpy().astype(np.int32)
      for logits in router_logits:
        if unordered:
          margins.append(selection_margin(model, logits))
          continue
        top = logits.float().sort(-1, descending=True).values   # the gap between the k-th and the next logit
        k = model.config.num_experts_per_tok
        margins.append(float((top[:, k - 1] - top[:, k]).min()) if top.shape[-1] > k else 1.0)
      chosen.clear()
      gen = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0)
      out[f'greedy_{i}'] = gen[0, ids.shape[1]:].numpy().astype(np.int32)
    # eval: non-overlapping windows of EVAL_SEQ_LEN tokens of TEXT, each predicting its tokens 2..S
    stream = torch.tensor(tok.encode(TEXT).ids)
    nll, count = 0.0, 0
    for start in range(0, len(stream), EVAL_SEQ_LEN):
      w = stream[start:start + EVAL_SEQ_LEN][None]
      if w.shape[1] < 2:
        continue
      logp = torch.log_softmax(model(w).logits.float(), -1)
      nll -= float(logp[0, :-1].gather(-1, w[0, 1:, None]).sum())
      count += w.shape[1] - 1
  for h in hooks:
    h.remove()
  out['eval_loss'] = np.float64(nll / count)
  out['eval_tokens'] = np.int64(count)
  out['router_margin'] = np.float64(min(margins))
  return out


def write(out_dir: pathlib.Path, only: list[str] | None = None) -> None:
  """Writes every fixture (the folder replaced), or only the named ones (their folders replaced)."""
  import numpy as np
  from safetensors.torch import save_file
  if only is None and out_dir.exists():
    shutil.rmtree(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'eval.txt').write_text(TEXT)
  with tempfile.TemporaryDirectory() as tmp:
    tok_path = pathlib.Path(tmp) / 'tokenizer.json'
    build_tokenizer(tok_path)
    for name, spec in FIXTURES.items():
      if only is not None and name not in only:
        continue
      if (out_dir / name).exists():
        shutil.rmtree(out_dir / name)
      for seed in range(20):   # the first seed whose routing is decisive on every prompt
        model = build_model(name, spec, seed)
        ref = reference(model, tok_path)
        if ref['router_margin'] > spec.get('margin', 1e-2):
          break
      folder = out_dir / name
      for layout in spec['layouts']:
        d = folder / layout
        if layout == 'per_expert':
          model.save_pretrained(d)
          for extra in ('generation_config.json',):
            (d / extra).unlink(missing_ok=True)
        else:
          d.mkdir(parents=True)
          model.config.to_json_file(d / 'config.json')
          save_file({k: v.contiguous() for k, v in model.state_dict().items()
                     if not (model.config.tie_word_embeddings and k == 'lm_head.weight')}, str(d / 'model.safetensors'),
                    metadata={'format': 'pt'})
        shutil.copyfile(tok_path, d / 'tokenizer.json')
      np.savez_compressed(folder / 'reference.npz', **ref)
      print(f'{name}: seed {seed}, router margin {ref["router_margin"]:.4f}, eval loss {ref["eval_loss"]:.4f}')
  total = sum(p.stat().st_size for p in out_dir.rglob('*') if p.is_file())
  print(f'wrote {out_dir} ({total / 1024:.0f} KiB)')


def check(fixtures: pathlib.Path, litejax_python: str, only: list[str] | None = None) -> int:
  """litejax import -> export in both layouts -> transformers from_pretrained -> the recorded logits."""
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM
  report, ok = {}, True
  with tempfile.TemporaryDirectory() as tmp:
    for name, spec in FIXTURES.items():
      if only is not None and name not in only:
        continue
      ref = np.load(fixtures / name / 'reference.npz')
      for layout in spec['layouts']:
        ckpt = pathlib.Path(tmp) / f'{name}_{layout}_ckpt'
        _litejax(litejax_python, 'import-hf', str(fixtures / name / layout), '--out', str(ckpt), '--seq-len', '16')
        exported = {}
        for out_layout in ('per-expert', 'fused'):
          out = pathlib.Path(tmp) / f'{name}_{layout}_{out_layout}'
          _litejax(litejax_python, 'export-hf', '--ckpt-dir', str(ckpt), '--out', str(out), '--layout', out_layout)
          model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **EAGER).eval()
          exported[out_layout] = model
          worst = 0.0
          with torch.no_grad():
            for i in range(len(PROMPTS)):
              logits = model(torch.tensor(ref[f'tokens_{i}'][None], dtype=torch.long)).logits[0].numpy()
              worst = max(worst, float(np.abs(logits - ref[f'logits_{i}']).max()))
          report[f'{name}/{layout} -> {out_layout}'] = worst
          ok &= worst <= TOL
        a, b = (dict(m.state_dict()) for m in exported.values())
        same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
        report[f'{name}/{layout}: per-expert and fused exports load the same weights'] = same
        ok &= same
  print(json.dumps({'max_abs_logit_difference': report, 'tolerance': TOL, 'ok': bool(ok)}, indent=2))
  return 0 if ok else 1


def _litejax(python: str, *args: str) -> None:
  r = subprocess.run([python, '-m', 'litejax.cli', *args, '--json'], capture_output=True, text=True,
                     env={**__import__('os').environ, 'JAX_PLATFORMS': 'cpu'})
  if r.returncode:
    sys.exit(f'litejax {args[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=OUT, help=f'fixture folder (default {OUT})')
  parser.add_argument('--check', action='store_true', help='import, export and load with transformers; compare')
  parser.add_argument('--only', nargs='+', choices=list(FIXTURES), help='write (or check) only these fixtures')
  parser.add_argument('--litejax-python', default=sys.executable,
                      help='the Python with litejax installed, for --check (default: this one)')
  args = parser.parse_args(argv)
  _need('torch')
  _need('transformers')
  if args.check:
    return check(args.out, args.litejax_python, args.only)
  write(args.out, args.only)
  return 0


if __name__ == '__main__':
  sys.exit(main())
