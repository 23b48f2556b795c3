"""LoRA adapters: shapes, init, forward-with-adapters == forward-with-merged-weights, PEFT layout round trip."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lora, qwen3

CFG = qwen3.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=10000.0)
ALL = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)


def random_params(cfg, seed=0, std=0.1, dtype=np.float32):
  """numpy-drawn params (eager jax.random costs a compile per shape on CPU); norms away from 1."""
  rng = np.random.default_rng(seed)
  flat = {p: (1.0 + 0.2 * rng.standard_normal(d.shape) if d.init == "ones" else std * rng.standard_normal(d.shape))
          for p, d in qwen3.param_decls(cfg).items()}
  return qwen3.unflatten({p: jnp.asarray(x.astype(dtype)) for p, x in flat.items()})


def _tokens(b=2, t=7):
  return jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def _random_b(adapters, seed=2, std=0.1):
  """Non-zero B (a trained adapter) so that the LoRA term actually contributes."""
  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
  out = [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) if p[-1].key == "b" else x for p, x in leaves]
  return jax.tree_util.tree_unflatten(tree, out)


_forward = jax.jit(qwen3.forward, static_argnums=0, static_argnames="lora_scale")


def test_config_normalises_targets_and_refuses_unknown():
  c = lora.LoraConfig(rank=8, alpha=16, targets="v,q,lm_head")
  assert c.targets == ("q", "v") and c.lm_head and c.scale == 2.0
  assert lora.LoraConfig.from_meta(c.to_meta()) == c
  with pytest.raises(ValueError, match="unknown target 'qproj'"):
    lora.LoraConfig(rank=8, targets=("qproj",))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=-1)
  assert lora.init_adapters(CFG, lora.LoraConfig(rank=0), jax.random.key(0)) is None


def test_adapter_shapes_follow_the_weight_contractions():
  L, D, F, V, H, K, Dh, r = 2, 64, 96, 128, 4, 2, 16, 4
  ad = lora.init_adapters(CFG, ALL, jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, ad)
  assert shapes["layers"]["q"] == {"a": (L, D, r), "b": (L, r, H, Dh)}
  assert shapes["layers"]["k"] == {"a": (L, D, r), "b": (L, r, K, Dh)}
  assert shapes["layers"]["o"] == {"a": (L, H, Dh, r), "b": (L, r, D)}
  assert shapes["layers"]["down"] == {"a": (L, F, r), "b": (L, r, D)}
  assert shapes["lm_head"] == {"a": (D, r), "b": (r, V)}
  decls = lora.adapter_decls(CFG, ALL)
  assert decls["layers/o/a"].axes == ("layers", "heads", "head_dim", "lora_rank")
  assert decls["layers/q/b"].axes == ("layers", "lora_rank", "heads", "head_dim")
  assert decls["lm_head/b"].axes == ("lora_rank", "vocab")
  # A is PEFT's kaiming-uniform: bounded by 1/sqrt(fan_in) of its own projection, B is exactly zero.
  for name, fan_in in (("q", D), ("o", H * Dh), ("down", F)):
    a = np.asarray(ad["layers"][name]["a"])
    assert 0.5 / np.sqrt(fan_in) < np.abs(a).max() <= 1 / np.sqrt(fan_in)
    assert not np.any(np.asarray(ad["layers"][name]["b"]))


def test_fresh_adapter_changes_no_logit():
  params = random_params(CFG)
  ad = lora.init_adapters(CFG, ALL, jax.random.key(1))
  tokens = _tokens()
  base = _forward(CFG, params, tokens)
  with_ad = _forward(CFG, params, tokens, adapters=ad, lora_scale=ALL.scale)
  # Bit-exact on CPU (y + 0 == y); on a GPU the extra LoRA dots change how XLA fuses the base matmul, which moves
  # fp32 logits by ~1e-6 (measured 1.2e-6 on an H200).
  atol = 0.0 if jax.default_backend() == "cpu" else 2e-6
  np.testing.assert_allclose(np.asarray(base), np.asarray(with_ad), rtol=0, atol=atol)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_with_adapters_equals_merged_forward(tied):
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
  params = random_params(cfg)
  ad = _random_b(lora.init_adapters(cfg, ALL, jax.random.key(1)))
  tokens = _tokens()
  base = np.asarray(_forward(cfg, params, tokens))
  with_ad = np.asarray(_forward(cfg, params, tokens, adapters=ad, lora_scale=ALL.scale))
  merged = lora.merge(cfg, params, ad, ALL.scale)
  merged_cfg = lora.merged_config(cfg, ad)
  assert merged_cfg.tie_word_embeddings is False  # an lm_head adapter unties a tied model
  assert "lm_head" in merged and set(merged) == {p.split("/")[0] for p in qwen3.param_decls(merged_cfg)}
  got = np.asarray(_forward(merged_cfg, merged, tokens))
  assert np.abs(with_ad - base).max() > 1e-2   # the adapter really changes the logits
  np.testing.assert_allclose(got, with_ad, atol=1e-5, rtol=0)
  # merge leaves its input untouched (the trainer keeps using the frozen base)
  np.testing.assert_array_equal(np.asarray(_forward(cfg, params, tokens)), base)


def test_merge_keeps_weight_dtype():
  params = random_params(CFG, dtype=jnp.bfloat16)
  ad = _random_b(lora.init_adapters(CFG, ALL, jax.random.key(1)))
  merged = lora.merge(CFG, params, ad, ALL.scale)
  assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_peft_layout_round_trip_is_exact():
  ad = _random_b(lora.init_adapters(CFG, ALL, jax.random.key(1)))
  tensors = dict(lora.peft_tensors(CFG, ad))
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
  assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 96)
  assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (128, 4)
  # HF o_proj input index is head * head_dim + d, i.e. A[l, h, d] -> lora_A[:, h * Dh + d]
  a_o = np.asarray(ad["layers"]["o"]["a"])
  np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"][:, 3 * 16 + 5],
                                a_o[1, 3, 5])
  back, targets = lora.adapters_from_peft(CFG, tensors, rank=4)
  assert targets == lora.ALL_TARGETS
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), back, ad)


def test_peft_import_refuses_partial_layers_and_foreign_tensors():
  ad = lora.init_adapters(CFG, lora.LoraConfig(rank=2, targets=("q",)), jax.random.key(1))
  tensors = dict(lora.peft_tensors(CFG, ad))
  partial = {k: v for k, v in tensors.items() if ".layers.1." not in k}
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.lora_A.*every layer"):
    lora.adapters_from_peft(CFG, partial, rank=2)
  with pytest.raises(ValueError, match="embed_tokens"):
    lora.adapters_from_peft(CFG, tensors | {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros(1)},
                            rank=2)
  with pytest.raises(ValueError, match=r"shape \(2, 64\), expected \(3, 64\)"):
    lora.adapters_from_peft(CFG, tensors, rank=3)
