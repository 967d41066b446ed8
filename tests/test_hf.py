"""Hugging Face import and export without compiling a model: both tensor layouts, round trips bit for bit,
coverage, and every unsupported checkpoint stopped with one line before anything is written. The numbers
against transformers: tests/test_hf_parity.py."""
import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from hf_helpers import EVAL_TEXT, FAMILIES, FIXTURES, assert_same_leaves, copy_fixture, import_all, leaves, reference
from litejax import cli
from litejax.hf.exporter import export_hf
from litejax.hf.families import family_for_config
from litejax.hf.importer import import_hf
from litejax.hf.weights import HFError, WeightIndex


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  return import_all(tmp_path_factory.mktemp('hf_import'))


def test_both_layouts_import_to_the_same_checkpoint(imported):
  for name, layouts in FAMILIES.items():
    for layout in layouts[1:]:
      assert_same_leaves(imported[name, layouts[0]], imported[name, layout])


@pytest.mark.parametrize('name', list(FAMILIES))
def test_import_export_import_is_bit_identical(imported, tmp_path, name):
  from litejax.train.checkpoint import restore_config
  first = imported[name, 'per_expert']
  for layout in ('per-expert', 'fused'):
    out = tmp_path / f'hf_{layout}'
    rep = export_hf(first, out, layout=layout)
    assert rep['tokenizer'] == ['tokenizer.json'] and (out / 'tokenizer.json').is_file()
    config = json.loads((out / 'config.json').read_text())
    source = json.loads((FIXTURES / name / 'per_expert' / 'config.json').read_text())
    assert config['architectures'] == source['architectures']
    for key in ('hidden_size', 'num_hidden_layers', 'head_dim', 'num_key_value_heads', 'tie_word_embeddings',
                'mlp_only_layers', 'decoder_sparse_step', 'norm_topk_prob', 'rms_norm_eps', 'bos_token_id',
                'first_k_dense_replace', 'n_group', 'topk_group', 'q_lora_rank', 'kv_lora_rank', 'rope_parameters',
                'routed_scaling_factor', 'n_shared_experts', 'moe_intermediate_size'):
      assert config.get(key) == source.get(key), key
    again = import_hf(out, tmp_path / f'again_{layout}', seq_len=16)
    assert again['layouts'] == [layout]
    assert_same_leaves(first, tmp_path / f'again_{layout}')
    assert restore_config(first) == restore_config(tmp_path / f'again_{layout}')
  # the published names: one tensor per expert (and Mixtral's block_sparse_moe)
  names = set(WeightIndex.open(tmp_path / 'hf_per-expert').tensors)
  assert names == set(WeightIndex.open(FIXTURES / name / 'per_expert').tensors)


def test_imported_checkpoint_holds_the_model_and_its_tokenizer(imported):
  from litejax.train import tokenizer as tokenizers
  from litejax.train.checkpoint import restore_config
  ckpt = imported['qwen3_moe', 'fused']
  cfg = restore_config(ckpt)
  assert cfg.model.qk_norm and cfg.model.dense_layers == '1' and not cfg.moe.renormalize
  assert [cfg.model.is_moe_layer(i) for i in range(3)] == [True, False, True]
  assert cfg.model.head_dim == 6 != cfg.model.d_model // cfg.model.num_heads
  tied = restore_config(imported['qwen3_moe_tied', 'per_expert'])
  assert tied.model.tie_embeddings and tied.moe.renormalize and tied.model.moe_every == 2
  ref = reference('qwen3_moe')
  tok = tokenizers.for_checkpoint(ckpt)
  assert tok.kind == 'hf' and tok.encode(str(ref['prompt_1'])).tolist() == ref['tokens_1'].tolist()
  assert tokenizers.for_checkpoint(FIXTURES).kind == 'bytes'
  # the experts' weights are transformers' own: expert 4 of layer 0, Mixtral's w1 (gate) read back transposed
  index = WeightIndex.open(FIXTURES / 'mixtral' / 'per_expert')
  w1 = index.read('model.layers.0.block_sparse_moe.experts.4.w1.weight')
  np.testing.assert_array_equal(leaves(imported['mixtral', 'per_expert'])['params/blocks/0/ffn/w_gate'][4], w1.T)


def test_store_import_writes_experts_to_the_store_only(tmp_path):
  from litejax.inference.store.disk import ExpertStore
  rep = import_hf(FIXTURES / 'mixtral' / 'fused', tmp_path / 'ckpt', store=str(tmp_path / 'store'), seq_len=16)
  assert rep['experts'] == 10 and rep['store'] == str(tmp_path / 'store')
  saved = leaves(tmp_path / 'ckpt')
  assert not any(k.endswith(('ffn/w_in', 'ffn/w_gate', 'ffn/w_out')) for k in saved)
  store = ExpertStore.open(str(tmp_path / 'store'))
  assert store.manifest['source']['ckpt_dir'] == str((tmp_path / 'ckpt').resolve())
  full = leaves(import_all_one(tmp_path, 'mixtral', 'fused'))
  got = store.read_experts(1, [0, 3])
  np.testing.assert_array_equal(got['w_out'], full['params/blocks/1/ffn/w_out'][[0, 3]])
  # export reads the experts back from the store: the same folder as from the resident checkpoint
  export_hf(tmp_path / 'ckpt', tmp_path / 'from_store')
  export_hf(tmp_path / 'resident', tmp_path / 'from_resident')
  assert (tmp_path / 'from_store' / 'model.safetensors').read_bytes() == \
      (tmp_path / 'from_resident' / 'model.safetensors').read_bytes()


def import_all_one(tmp_path, name, layout):
  import_hf(FIXTURES / name / layout, tmp_path / 'resident', seq_len=16)
  return tmp_path / 'resident'


def test_bfloat16_import_rounds_once(tmp_path):
  import ml_dtypes
  import_hf(FIXTURES / 'mixtral' / 'per_expert', tmp_path / 'bf16', dtype='bfloat16', seq_len=16)
  got = leaves(tmp_path / 'bf16')['params/embed']
  want = WeightIndex.open(FIXTURES / 'mixtral' / 'per_expert').read('model.embed_tokens.weight')
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------- what is refused, and how

def _config_edit(**changes):
  def edit(folder: pathlib.Path):
    raw = json.loads((folder / 'config.json').read_text())
    raw.update(changes)
    (folder / 'config.json').write_text(json.dumps(raw))
  return edit


def _tensors_edit(fn):
  def edit(folder: pathlib.Path):
    index = WeightIndex.open(folder)
    tensors = {t.name: index.read(name) for name, t in index.tensors.items()}
    fn(tensors)
    save_file(tensors, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  return edit


def _drop(name):
  return lambda t: t.pop(name)


def _add(name, value):
  return lambda t: t.update({name: value})


BAD = [
    ('qwen3_moe', _config_edit(architectures=['LlamaForCausalLM']), 'architectures: LlamaForCausalLM is not supported'),
    ('qwen3_moe', _config_edit(rope_scaling={'rope_type': 'yarn', 'factor': 4.0}), 'rope_scaling.rope_type'),
    ('qwen3_moe', _config_edit(use_sliding_window=True, sliding_window=8), 'use_sliding_window'),
    ('qwen3_moe', _config_edit(attention_bias=True), 'attention_bias'),
    ('qwen3_moe', _config_edit(hidden_act='gelu'), 'hidden_act'),
    ('qwen3_moe', _config_edit(mystery_option=3), 'mystery_option: unknown field'),
    ('qwen3_moe', _config_edit(mlp_only_layers=[7]), 'mlp_only_layers'),
    ('mixtral', _config_edit(sliding_window=4096), 'sliding_window'),
    ('mixtral', _config_edit(router_jitter_noise=0.1), 'router_jitter_noise'),
    ('mixtral', _config_edit(model_type='llama'), 'model_type'),
    ('mixtral', _config_edit(tie_word_embeddings=True), 'tie_word_embeddings'),
    ('mixtral', _config_edit(intermediate_size=14), 'has shape'),
    ('mixtral', _config_edit(num_local_experts=4), 'gate.weight has shape (5, 16), config.json implies (4, 16)'),
    ('mixtral', _tensors_edit(_add('model.layers.1.block_sparse_moe.experts.5.w3.weight', np.zeros((12, 16), np.float32))),
     'experts.5.w3.weight (12, 16) has no place'),
    ('qwen3_moe_tied', _config_edit(tie_word_embeddings=False), 'tie_word_embeddings'),
    ('qwen3_moe', _tensors_edit(_add('model.layers.0.self_attn.q_proj.bias', np.zeros(24, np.float32))),
     'q_proj.bias'),
    ('qwen3_moe', _tensors_edit(_drop('model.layers.2.mlp.experts.5.up_proj.weight')), 'experts.5.up_proj.weight'),
    ('qwen3_moe', _tensors_edit(_drop('model.layers.0.self_attn.k_norm.weight')), 'k_norm.weight is missing'),
    ('qwen3_moe', _tensors_edit(_add('model.layers.0.mlp.experts.gate_up_proj', np.zeros((6, 20, 16), np.float32))),
     'both one tensor per expert'),
    ('qwen3_moe', _tensors_edit(_add('model.layers.0.mlp.gate.qweight', np.zeros((6, 4), np.int8))), 'I8'),
    ('deepseek_v3', _config_edit(quantization_config={'quant_method': 'fp8', 'weight_block_size': [128, 128]}),
     "quantization_config: 'fp8' quantised weights"),
    ('deepseek_v3', _config_edit(rope_interleave=False), 'rope_interleave'),
    ('deepseek_v3', _config_edit(scoring_func='softmax'), 'scoring_func'),
    ('deepseek_v3', _config_edit(topk_method='group_limited_greedy'), 'topk_method'),
    ('deepseek_v3', _config_edit(moe_layer_freq=2), 'moe_layer_freq'),
    ('deepseek_v3', _config_edit(n_shared_experts=0), 'n_shared_experts'),
    ('deepseek_v3', _config_edit(n_group=5), 'n_group: 5 groups do not divide the 12 experts'),
    ('deepseek_v3', _config_edit(topk_group=1, num_experts_per_tok=4), 'num_experts_per_tok: 4 exceeds the 3'),
    ('deepseek_v3', _config_edit(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0,
                                                  'attention_factor': 1.2}), 'rope_parameters.attention_factor'),
    ('deepseek_v3', _config_edit(rope_parameters={'rope_type': 'llama3', 'rope_theta': 1e4}),
     'rope_parameters.rope_type'),
    ('deepseek_v3', _config_edit(num_mtp_layers=2), 'num_mtp_layers'),
    ('deepseek_v3', _config_edit(mystery_option=3), 'mystery_option: unknown field'),
    # one MTP layer is declared (model.layers.3.*, skipped); a fifth layer is not
    ('deepseek_v3', _tensors_edit(_add('model.layers.4.eh_proj.weight', np.zeros((16, 32), np.float32))),
     'model.layers.4.eh_proj.weight (16, 32) has no place'),
    ('deepseek_v3', _tensors_edit(_drop('model.layers.1.mlp.gate.e_score_correction_bias')),
     'e_score_correction_bias is missing'),
    ('qwen3_moe', lambda f: (f / 'tokenizer.json').unlink(), 'no tokenizer.json'),
    ('qwen3_moe', lambda f: (f / 'config.json').unlink(), 'config.json: missing'),
    ('qwen3_moe', lambda f: (f / 'model.safetensors').rename(f / 'model-00001-of-00002.safetensors'),
     'shards need model.safetensors.index.json'),
]


@pytest.mark.parametrize('name, edit, message', BAD, ids=[f'{b[0]}:{b[2][:30]}' for b in BAD])
def test_unsupported_checkpoints_stop_before_writing(tmp_path, capsys, name, edit, message):
  src = copy_fixture(name, 'per_expert', tmp_path / 'src')
  edit(src)
  rc = cli.main(['import-hf', str(src), '--out', str(tmp_path / 'out'), '--store', str(tmp_path / 'store')])
  err = capsys.readouterr().err
  assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'store').exists()


def test_deepseek_mtp_layers_are_skipped_and_reported(tmp_path, capsys):
  """num_nextn_predict_layers: 1 declares model.layers.3.* (multi-token prediction, which litejax does not
  model): an import skips those tensors and lists them; the published rope_scaling / rope_theta spelling reads
  as transformers 5's rope_parameters."""
  from litejax.train.checkpoint import restore_config
  src = copy_fixture('deepseek_v3', 'per_expert', tmp_path / 'src')
  mtp = {'model.layers.3.eh_proj.weight': np.ones((16, 32), np.float32),
         'model.layers.3.mlp.experts.0.gate_proj.weight': np.ones((6, 16), np.float32)}
  _tensors_edit(lambda t: t.update(mtp))(src)
  raw = json.loads((src / 'config.json').read_text())
  rope = raw.pop('rope_parameters')
  raw.update(rope_theta=rope.pop('rope_theta'), rope_scaling={**rope, 'type': rope.pop('rope_type')})
  (src / 'config.json').write_text(json.dumps(raw))
  rep = import_hf(src, tmp_path / 'ckpt', seq_len=16)
  assert rep['not_modelled']['tensors'] == 2 and rep['not_modelled']['names'] == sorted(mtp)
  assert 'multi-token-prediction' in rep['not_modelled']['why']
  from litejax.cli import main
  assert main(['import-hf', str(src), '--out', str(tmp_path / 'ckpt_cli'), '--seq-len', '16', '--quiet']) == 0
  assert 'not imported: 2 tensors under model.layers.3.' in capsys.readouterr().out
  cfg = restore_config(tmp_path / 'ckpt')
  assert cfg == restore_config(import_all_one(tmp_path, 'deepseek_v3', 'per_expert'))
  assert cfg.model.dense_layers == '0' and cfg.model.rope_scaling == 'yarn' and cfg.moe.group_score == 'top2_experts'
  assert_same_leaves(tmp_path / 'ckpt', tmp_path / 'resident')


def test_a_previous_folder_is_replaced_only_with_overwrite(tmp_path, capsys):
  src = FIXTURES / 'qwen3_moe' / 'fused'
  args = ['import-hf', str(src), '--out', str(tmp_path / 'ckpt'), '--seq-len', '16', '--json']
  assert cli.main(args) == 0
  capsys.readouterr()
  before = leaves(tmp_path / 'ckpt')
  assert cli.main(args) == 2 and 'pass --overwrite' in capsys.readouterr().err
  assert cli.main(args + ['--overwrite']) == 0
  assert leaves(tmp_path / 'ckpt').keys() == before.keys()
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  for out, message in ((tmp_path / 'other', 'holds no litejax checkpoint'), (src, 'must not be the Hugging Face'),
                       (src / 'ckpt', 'must not be the Hugging Face')):
    assert cli.main(['import-hf', str(src), '--out', str(out), '--overwrite']) == 2
    assert message in capsys.readouterr().err
  assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine' and not (src / 'ckpt').exists()


def test_export_names_what_does_not_map(imported, tmp_path, capsys):
  from litejax.config import from_dict, load_config, parse_overrides
  cases = [('tiny', [], 'moe.num_shared_experts'), ('tiny_hier', [], 'moe.num_tiers/groups_per_tier'),
           ('tiny', ['moe.num_shared_experts=0', 'moe.score=sigmoid'], 'moe.score'),
           ('tiny', ['moe.num_shared_experts=0', 'moe.expert_kind=mlp'], 'moe.expert_kind'),
           ('tiny', ['moe.num_shared_experts=0', 'moe.renormalize=false'], 'moe.renormalize'),
           ('tiny', ['moe.num_shared_experts=0', 'model.moe_every=2'], 'every Mixtral layer is MoE')]
  for config, overrides, field in cases:
    with pytest.raises(HFError, match=field.replace('.', r'\.').replace('/', '/')):
      family_for_config(load_config(config, overrides))
  assert family_for_config(load_config('tiny', ['moe.num_shared_experts=0'])).name == 'mixtral'
  from litejax.train.checkpoint import restore_config
  ds = restore_config(imported['deepseek_v3', 'fused'])
  assert family_for_config(ds).name == 'deepseek_v3'
  for overrides, field in ((['moe.expert_selection=per_group'], 'moe.expert_selection'),
                           (['model.dense_layers="1"'], 'a prefix (first_k_dense_replace)'),
                           (['moe.group_score=router'], 'moe.group_score'),
                           (['moe.d_shared=4'], 'moe.d_shared'),
                           (['moe.num_tiers=2', 'moe.k_tier=2'], 'moe.num_tiers')):
    with pytest.raises(HFError, match=field.replace('.', r'\.').replace('(', r'\(').replace(')', r'\)')):
      family_for_config(from_dict(parse_overrides(overrides), base=ds))
  rc = cli.main(['export-hf', '--ckpt-dir', str(imported['qwen3_moe', 'fused']), '--out', str(tmp_path / 'x'),
                 '--family', 'mixtral'])
  err = capsys.readouterr().err
  assert rc == 2 and 'does not map onto MixtralForCausalLM: model.moe_every/dense_layers' in err, err
  assert not (tmp_path / 'x').exists()


def test_stored_config_answers_params(imported, capsys):
  assert cli.main(['params', '--ckpt-dir', str(imported['mixtral', 'per_expert']), '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  index = WeightIndex.open(FIXTURES / 'mixtral' / 'per_expert')
  assert out['params_total'] == sum(int(np.prod(t.shape)) for t in index.tensors.values())
  assert cli.main(['params', '--ckpt-dir', str(FIXTURES)]) == 2
  assert 'holds no checkpoint' in capsys.readouterr().err


def test_eval_refuses_bad_input(imported, tmp_path, capsys):
  ckpt = str(imported['qwen3_moe', 'fused'])
  (tmp_path / 'one.txt').write_text('a')          # <s> a: 2 tokens, one window of one prediction is fine
  (tmp_path / 'empty.txt').write_text('')
  for argv, message in ((['--data', str(tmp_path / 'missing.txt')], 'no such file'),
                        (['--data', str(tmp_path / 'empty.txt')], 'text file is empty'),
                        (['--data', str(EVAL_TEXT), '--seq-len', '1'], '--seq-len: must be >= 2'),
                        (['--data', str(EVAL_TEXT), '--batch', '0'], '--batch')):
    try:
      rc = cli.main(['eval', '--ckpt-dir', ckpt, *argv])
    except SystemExit as e:   # argparse's own errors (one line too, litejax.cli._Parser)
      rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- the published models

# config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-235B-A22B as published (transformers 4.x names).
PUBLISHED = {
    'mixtral_8x7b': dict(
        architectures=['MixtralForCausalLM'], attention_dropout=0.0, bos_token_id=1, eos_token_id=2, hidden_act='silu',
        hidden_size=4096, initializer_range=0.02, intermediate_size=14336, max_position_embeddings=32768,
        model_type='mixtral', num_attention_heads=32, num_experts_per_tok=2, num_hidden_layers=32,
        num_key_value_heads=8, num_local_experts=8, output_router_logits=False, rms_norm_eps=1e-05,
        rope_theta=1000000.0, router_aux_loss_coef=0.02, sliding_window=None, tie_word_embeddings=False,
        torch_dtype='bfloat16', transformers_version='4.36.0.dev0', use_cache=True, vocab_size=32000),
    'qwen3_235b_a22b': dict(
        architectures=['Qwen3MoeForCausalLM'], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
        decoder_sparse_step=1, eos_token_id=151645, head_dim=128, hidden_act='silu', hidden_size=4096,
        initializer_range=0.02, intermediate_size=12288, max_position_embeddings=40960, max_window_layers=94,
        mlp_only_layers=[], model_type='qwen3_moe', moe_intermediate_size=1536, norm_topk_prob=True,
        num_attention_heads=64, num_experts=128, num_experts_per_tok=8, num_hidden_layers=94, num_key_value_heads=4,
        output_router_logits=False, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0,
        router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False, torch_dtype='bfloat16',
        transformers_version='4.51.0', use_cache=True, use_sliding_window=False, vocab_size=151936),
}
# config.json of deepseek-ai/DeepSeek-V3 as published, less its quantization_config (FP8 blocks: refused, below);
# a bfloat16 conversion of it reads as this.
DEEPSEEK_V3 = dict(
    architectures=['DeepseekV3ForCausalLM'], attention_bias=False, attention_dropout=0.0,
    auto_map={'AutoConfig': 'configuration_deepseek.DeepseekV3Config',
              'AutoModel': 'modeling_deepseek.DeepseekV3Model',
              'AutoModelForCausalLM': 'modeling_deepseek.DeepseekV3ForCausalLM'},
    aux_loss_alpha=0.001, bos_token_id=0, eos_token_id=1, ep_size=1, first_k_dense_replace=3, hidden_act='silu',
    hidden_size=7168, initializer_range=0.02, intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840,
    model_type='deepseek_v3', moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256,
    n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
    num_key_value_heads=128, num_nextn_predict_layers=1, pretraining_tp=1, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, rms_norm_eps=1e-06,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type='yarn'),
    rope_theta=10000, routed_scaling_factor=2.5, scoring_func='sigmoid', seq_aux=True, tie_word_embeddings=False,
    topk_group=4, topk_method='noaux_tc', torch_dtype='bfloat16', transformers_version='4.33.1', use_cache=True,
    v_head_dim=128, vocab_size=129280)
# Their published parameter counts (total, active per token).
PUBLISHED_PARAMS = {'mixtral_8x7b': (46.7e9, 12.9e9), 'qwen3_235b_a22b': (235e9, 22e9)}


def test_published_deepseek_v3_config_maps_onto_the_shipped_one():
  """The published config.json gives configs/deepseek_v3.yaml's model but for the dense prefix (the shipped
  config scans its layers, which model.dense_layers cannot be combined with yet: config_rules), and its
  parameter counts: 671.03B total (published 671B); 37.55B active per token, litejax counting the input
  embedding and output tables (published "37B"). The MTP layer (num_nextn_predict_layers) is not counted."""
  import dataclasses

  from litejax.config import load_config
  from litejax.hf.config_fields import ConfigFields
  from litejax.hf.families import family_for_hf
  from litejax.model import bounds
  cfg = family_for_hf(DEEPSEEK_V3).to_config(ConfigFields(DEEPSEEK_V3), 'bfloat16')
  shipped = load_config('deepseek_v3')
  assert cfg.model.dense_layers == '0-2' and not cfg.model.scan_layers
  assert dataclasses.replace(cfg.model, scan_layers=True, dense_layers='') == shipped.model and cfg.moe == shipped.moe
  counts = bounds.param_counts(cfg)
  assert counts.total == 671_026_404_352 and abs(counts.total / 671e9 - 1) < 1e-4
  assert counts.active_per_token == 37_552_282_624
  quantised = {**DEEPSEEK_V3, 'quantization_config': {'quant_method': 'fp8', 'weight_block_size': [128, 128]}}
  with pytest.raises(HFError, match="config.json: quantization_config: 'fp8'"):
    family_for_hf(quantised).to_config(ConfigFields(quantised), 'bfloat16')


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_shipped_configs_are_the_published_models(name):
  import dataclasses

  from litejax.config import load_config
  from litejax.hf.config_fields import ConfigFields
  from litejax.hf.families import family_for_hf
  from litejax.model import bounds
  raw = PUBLISHED[name]
  cfg = family_for_hf(raw).to_config(ConfigFields(raw), 'bfloat16')
  shipped = load_config(name)
  assert dataclasses.replace(cfg.model, scan_layers=True) == shipped.model and cfg.moe == shipped.moe
  counts = bounds.param_counts(shipped)
  total, active = PUBLISHED_PARAMS[name]
  assert abs(counts.total / total - 1) < 0.01 and abs(counts.active_per_token / active - 1) < 0.01


def test_a_scanned_model_exports_as_its_unscanned_twin(imported, tmp_path):
  """export-hf reads a scanned checkpoint's stacked leaves layer by layer: the same folder as unscanned."""
  import dataclasses

  import jax
  from flax import nnx

  from litejax.hf.importer import abstract_state
  from litejax.train.checkpoint import Checkpointer, restore_config
  from litejax.train.step import initial_rng
  src = imported['mixtral', 'per_expert']
  cfg = restore_config(src)
  scanned = cfg.replace(model=dataclasses.replace(cfg.model, scan_layers=True))
  flat = leaves(src)
  params, extra = abstract_state(scanned)
  filled = []
  for path, var in nnx.to_flat_state(params):   # ('periods', 'layers', 0, 'attn', 'w_q'): layer p of the stack
    name = '/'.join(map(str, path))
    if path[0] == 'periods':
      rest = '/'.join(map(str, path[3:]))
      value = np.stack([flat[f'params/blocks/{i}/{rest}'] for i in range(cfg.model.num_layers)])
    else:
      value = flat['params/' + name]
    filled.append((path, var.replace(jax.numpy.asarray(value))))
  ckpt = Checkpointer(tmp_path / 'scanned', async_save=False)
  ckpt.save(0, {'params': nnx.from_flat_state(filled), 'extra': extra, 'step': np.int32(0),
                'rng': initial_rng(0)}, {'config': scanned.to_dict()})
  ckpt.close()
  export_hf(tmp_path / 'scanned', tmp_path / 'a')
  export_hf(src, tmp_path / 'b')
  assert (tmp_path / 'a' / 'model.safetensors').read_bytes() == (tmp_path / 'b' / 'model.safetensors').read_bytes()


@pytest.mark.slow   # compiles the scanned model's init
def test_a_scanned_deepseek_exports_its_selection_bias(imported, tmp_path):
  """A scanned DeepSeek-V3 model (every layer MoE, as configs/deepseek_v3.yaml): export-hf reads the stacked
  parameters and the stacked selection bias (state under extra/) layer by layer; importing the export gives
  them back unscanned."""
  import dataclasses

  from flax import nnx

  from litejax.model.transformer import init_model
  from litejax.train.checkpoint import Checkpointer, restore_config
  from litejax.train.step import initial_rng
  base = restore_config(imported['deepseek_v3', 'fused'])
  cfg = base.replace(model=dataclasses.replace(base.model, dense_layers='', scan_layers=True))
  _, params, extra = nnx.split(init_model(cfg, 3), nnx.Param, ...)
  bias = np.arange(3 * 12, dtype=np.float32).reshape(3, 12) % 5 / 2   # [periods, E]
  extra = nnx.from_flat_state([(p, v.replace(bias if p[-1] == 'bias_expert' else v[...]))
                               for p, v in nnx.to_flat_state(extra)])
  ckpt = Checkpointer(tmp_path / 'scanned', async_save=False)
  ckpt.save(0, {'params': params, 'extra': extra, 'step': np.int32(0), 'rng': initial_rng(0)},
            {'config': cfg.to_dict()})
  ckpt.close()
  export_hf(tmp_path / 'scanned', tmp_path / 'hf', layout='fused')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['first_k_dense_replace'] == 0 and config['num_nextn_predict_layers'] == 0
  import_hf(tmp_path / 'hf', tmp_path / 'again', seq_len=16, tokenizer=False)
  again = leaves(tmp_path / 'again')
  stacked = params['periods']['layers'][0]
  for i in range(3):
    for name in ('attn/w_q_b', 'attn/w_kv_a', 'ffn/router_expert', 'ffn/w_out', 'ffn/shared/w_in'):
      node = stacked
      for part in name.split('/'):
        node = node[part]
      np.testing.assert_array_equal(again[f'params/blocks/{i}/{name}'], np.asarray(node[...])[i])
  ckpt = Checkpointer(tmp_path / 'again', read_only=True)
  try:
    for i in range(3):
      np.testing.assert_array_equal(ckpt.read_leaf(0, f'extra/blocks/{i}/ffn/bias_expert'), bias[i])
  finally:
    ckpt.close()
  assert restore_config(tmp_path / 'again').model == dataclasses.replace(cfg.model, scan_layers=False)
