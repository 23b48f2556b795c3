"""Tiny random transformers Qwen3 models for parity tests (torch is a test-only dependency)."""
from __future__ import annotations

import numpy as np
import torch
import transformers


def hf_config(**overrides) -> transformers.Qwen3Config:
  kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=10000.0,
            max_position_embeddings=512)
  kw.update(overrides)
  return transformers.Qwen3Config(**kw)


def random_hf_model(seed: int = 0, std: float = 0.1, **overrides) -> transformers.Qwen3ForCausalLM:
  """A Qwen3ForCausalLM with random weights large enough that logits are not near-uniform, and norm weights
  away from 1 so a norm applied in the wrong place shows up."""
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(hf_config(**overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(1.0, 0.2)
      else:
        p.normal_(0.0, std)
  return model


def save_hf_model(model, path) -> str:
  model.save_pretrained(str(path))
  return str(path)


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None, dtype=torch.float32) -> np.ndarray:
  """Reference logits with positions counted over real tokens (cumsum - 1), as jopd does."""
  tokens_t = torch.tensor(np.asarray(tokens), dtype=torch.long)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model.to(dtype)(tokens_t, attention_mask=torch.tensor(mask.astype(np.int64)),
                          position_ids=torch.tensor(positions)).logits
  return out.float().numpy()
