"""Hugging Face checkpoints in and out: config.json <-> litejax config, safetensors <-> litejax parameters.

  weights.py        the safetensors of a folder: headers, one tensor (or expert) per read, sharded writes
  config_fields.py  config.json read field by field (an unknown field is an error naming it)
  mapping.py        Family, Tensor, ExpertArray: which HF tensor fills which litejax parameter; plan_import's checks
  families.py       Mixtral and Qwen3-MoE, the registry FAMILIES, family_for_hf / family_for_config
  deepseek.py       DeepSeek-V3: MLA with YaRN, pooled group-limited sigmoid routing, a dense prefix
  importer.py       import_hf: a Hugging Face folder -> a litejax checkpoint folder (+ an expert store)
  exporter.py       export_hf: a litejax checkpoint -> a folder transformers' from_pretrained loads
"""
