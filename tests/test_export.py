"""Export: PEFT adapters load in `peft.PeftModel` with jopd's logits and import back identically; PEFT-written
adapters import with PEFT's logits; merged checkpoints load in transformers with jopd's logits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

from jopd import checkpoint, export
from models import hf, lora, qwen3
from tests.helpers import hf_logits, random_hf_model, save_hf_model

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.default_rng(5).integers(0, 128, (2, 9))
_forward = jax.jit(qwen3.forward, static_argnums=0, static_argnames="lora_scale")


def _save_tokenizer(path):
  import tokenizers
  vocab = {f"t{i}": i for i in range(126)} | {"<unk>": 126, "<|im_end|>": 127}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>") \
      .save_pretrained(str(path))


def _base(tmp_path_factory, tied):
  path = tmp_path_factory.mktemp("tied" if tied else "untied")
  model = random_hf_model(seed=int(tied), tie_word_embeddings=tied, **SIZES)
  save_hf_model(model, path)
  _save_tokenizer(path)
  cfg, params = hf.load_pretrained(str(path), dtype=jnp.float32)
  return str(path), cfg, params


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  return _base(tmp_path_factory, tied=False)


def _trained_adapters(cfg, lora_cfg, seed=3):
  """Adapters as after training: B non-zero, so exporting a B=0 adapter could not pass by accident."""
  rng = np.random.default_rng(seed)
  ad = lora.init_adapters(cfg, lora_cfg, jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32) if p[-1].key == "b" else x, ad)


def _save_run(directory, trainable, meta, step=4):
  """What the trainer saves (same function): trainable weights + optimizer-like extras + JSON meta."""
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(step, {"trainable": trainable, "opt_state": jax.tree.map(jnp.zeros_like, trainable),
                     "rng": jax.random.key(0), "step": jnp.asarray(step)}, data_state={"next": 1}, meta=meta)
  return str(directory)


def test_peft_export_matches_peft_model_and_imports_back(untied, tmp_path):
  base_dir, cfg, params = untied
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
  adapters = _trained_adapters(cfg, lora_cfg)
  ckpt = _save_run(tmp_path / "ckpt", adapters, {"model_name": base_dir, **lora_cfg.to_meta(), "lr": 1e-4})
  out = tmp_path / "peft"
  subprocess.run([sys.executable, "-m", "jopd.export", f"--checkpoint={ckpt}", f"--out={out}", "--format=peft"],
                 check=True, cwd=ROOT, env=os.environ | {"JAX_PLATFORMS": "cpu"}, capture_output=True)
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == base_dir
  assert sorted(config["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])

  model = peft.PeftModel.from_pretrained(random_hf_model(seed=0, **SIZES), str(out)).eval()
  want = np.asarray(_forward(cfg, params, jnp.asarray(TOKENS), adapters=adapters, lora_scale=lora_cfg.scale))
  base = np.asarray(_forward(cfg, params, jnp.asarray(TOKENS)))
  got = hf_logits(model, TOKENS)
  assert np.abs(want - base).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  imported, imported_cfg = export.import_peft(str(out), cfg)
  assert imported_cfg == lora_cfg
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), imported, adapters)


def test_adapter_written_by_peft_imports_with_peft_logits(untied, tmp_path):
  base_dir, cfg, params = untied
  model = random_hf_model(seed=0, **SIZES)
  peft_cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj", "down_proj", "lm_head"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, peft_cfg)
  import torch
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.1)
  model.save_pretrained(str(tmp_path))   # also writes lm_head.base_layer.weight, which import must skip
  adapters, lora_cfg = export.import_peft(str(tmp_path), cfg)
  assert lora_cfg == lora.LoraConfig(rank=2, alpha=6.0, targets=("q", "o", "down", "lm_head"))
  got = np.asarray(_forward(cfg, params, jnp.asarray(TOKENS), adapters=adapters, lora_scale=lora_cfg.scale))
  np.testing.assert_allclose(got, hf_logits(model.eval(), TOKENS), atol=1e-4, rtol=0)

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
  with pytest.raises(ValueError, match="use_dora=True is not supported"):
    export.import_peft(str(tmp_path), cfg)
  (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "v_proj"]}))
  with pytest.raises(ValueError, match="target_modules lists 'v_proj' but the file holds no adapter"):
    export.import_peft(str(tmp_path), cfg)


def test_merged_export_of_tied_model_with_lm_head_adapter(tmp_path_factory, tmp_path):
  base_dir, cfg, params = _base(tmp_path_factory, tied=True)
  lora_cfg = lora.LoraConfig(rank=4, alpha=16.0, targets=("q", "v", "down", "lm_head"))
  adapters = _trained_adapters(cfg, lora_cfg, seed=7)
  ckpt = _save_run(tmp_path / "ckpt", adapters, {"model_name": base_dir, **lora_cfg.to_meta()})
  out = export.export(ckpt, str(tmp_path / "merged"), "merged")

  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
  assert model.config.tie_word_embeddings is False   # the lm_head adapter unties the merged model
  want = np.asarray(_forward(cfg, params, jnp.asarray(TOKENS), adapters=adapters, lora_scale=lora_cfg.scale))
  np.testing.assert_allclose(hf_logits(model, TOKENS), want, atol=1e-4, rtol=0)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "merged" / name).read_bytes() == open(os.path.join(base_dir, name), "rb").read()
  assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_full_fine_tuning_exports_merged_only(untied, tmp_path):
  base_dir, cfg, params = untied
  trained = jax.tree.map(lambda x: x * 1.5, params)
  ckpt = _save_run(tmp_path / "ckpt", trained, {"model_name": base_dir, "lora_rank": 0})
  with pytest.raises(ValueError, match="full fine-tuning.*--format=merged"):
    export.export(ckpt, str(tmp_path / "peft"), "peft")
  out = export.export(ckpt, str(tmp_path / "merged"), "merged", dtype="float32")
  _, loaded = hf.load_pretrained(out, dtype=jnp.float32)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded, trained)
