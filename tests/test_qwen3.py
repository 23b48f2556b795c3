"""models/qwen3.py against transformers' Qwen3ForCausalLM: logits (fp32, bf16) and the KV-cache path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hf, qwen3
from tests import helpers

FP32_TOL = 1e-4      # max |logit difference| at unpadded positions, fp32
BF16_KL_TOL = 1e-3   # mean KL(reference || jopd) over unpadded positions, bf16

# Together: head_dim != hidden/heads; GQA ratios 1, 2, 4; tied and untied; rope theta 1e4 and 1e6.
CONFIGS = {
    "gqa2_headdim24_untied_theta1e4": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                            tie_word_embeddings=False, rope_theta=1e4),
    "gqa1_tied_theta1e6": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                               tie_word_embeddings=True, rope_theta=1e6),
    "gqa4_headdim32_untied_theta1e6": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                           tie_word_embeddings=False, rope_theta=1e6, num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request, tmp_path_factory):
  ref = helpers.random_hf_model(seed=len(request.param), **CONFIGS[request.param])
  path = helpers.save_hf_model(ref, tmp_path_factory.mktemp(request.param))
  cfg, params = hf.load_pretrained(path, dtype=jnp.float32)
  return ref, cfg, params, path


def _padded_batch(seed, pad_side, vocab=300, length=12):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (3, length))
  lengths = [length, length - 5, length - 9]
  mask = np.zeros((3, length), bool)
  for i, n in enumerate(lengths):
    if pad_side == "left":
      mask[i, length - n:] = True
    else:
      mask[i, :n] = True
  return tokens, mask


def test_config_from_hf_reads_fields(model_pair):
  ref, cfg, _, _ = model_pair
  c = ref.config
  assert (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads) == (c.head_dim, c.num_attention_heads,
                                                              c.num_key_value_heads)
  assert cfg.tie_word_embeddings == c.tie_word_embeddings
  assert cfg.rope_theta == c.rope_parameters["rope_theta"]
  assert cfg.num_params == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("pad_side, length", [("left", 12), ("right", 12), ("left", 192), ("right", 192)])
def test_fp32_logits_match_transformers(model_pair, pad_side, length):
  # 192 tokens: causal attention in three 64-query blocks (qwen3.causal_block); 12: one dense block.
  ref, cfg, params, _ = model_pair
  tokens, mask = _padded_batch(1, pad_side, length=length)
  expected = helpers.hf_logits(ref, tokens, mask)
  got = np.asarray(jax.jit(qwen3.forward, static_argnums=0)(cfg, params, tokens, mask))
  assert got.shape == expected.shape
  assert np.abs(got - expected)[mask].max() < FP32_TOL


def test_bf16_logits_close_to_transformers_bf16(model_pair):
  import torch
  ref, cfg, _, path = model_pair
  _, params_bf16 = hf.load_pretrained(path, dtype=jnp.bfloat16)
  tokens, mask = _padded_batch(2, "left")
  expected = helpers.hf_logits(ref, tokens, mask, dtype=torch.bfloat16)
  ref.to(torch.float32)
  got = np.asarray(qwen3.forward(cfg, params_bf16, tokens, mask))
  log_p = jax.nn.log_softmax(expected, axis=-1)
  log_q = jax.nn.log_softmax(got, axis=-1)
  kl = np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))[mask]
  assert kl.mean() < BF16_KL_TOL
  # The comparison is not vacuous: bf16 rounding does move the logits.
  assert np.abs(got - expected)[mask].max() > 0


def test_left_padding_does_not_change_logits():
  cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = qwen3.init_params(cfg, jax.random.key(0), std=0.2)
  tokens = np.random.RandomState(0).randint(0, 64, (1, 7))
  alone = qwen3.forward(cfg, params, tokens)
  padded = np.concatenate([np.zeros((1, 3), int), tokens], axis=1)
  mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 7), bool)], axis=1)
  shifted = qwen3.forward(cfg, params, padded, mask)
  np.testing.assert_allclose(shifted[:, 3:], alone, atol=1e-5)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_prefill_then_decode_matches_forward(model_pair, pad_side):
  _, cfg, params, _ = model_pair
  steps = 16
  prompt_tokens, prompt_mask = _padded_batch(3, pad_side)
  b, t = prompt_tokens.shape
  continuation = np.random.RandomState(4).randint(0, cfg.vocab_size, (b, steps))

  cache = qwen3.init_cache(cfg, b, t + steps, jnp.float32)
  logits_bv, cache = jax.jit(qwen3.prefill, static_argnums=0)(cfg, params, prompt_tokens, prompt_mask, cache)
  decode = jax.jit(qwen3.decode_step, static_argnums=0)
  step_logits = [logits_bv]
  for i in range(steps):
    logits_bv, cache = decode(cfg, params, continuation[:, i], cache)
    step_logits.append(logits_bv)
  step_logits = np.stack(step_logits, axis=1)  # [B, steps + 1, V]

  # The same sequences run whole: real prompt tokens, then the continuation, left-aligned.
  full_tokens = np.zeros((b, t + steps), int)
  full_mask = np.zeros((b, t + steps), bool)
  last = []
  for i in range(b):
    real = prompt_tokens[i][prompt_mask[i]]
    n = len(real)
    full_tokens[i, :n + steps] = np.concatenate([real, continuation[i]])
    full_mask[i, :n + steps] = True
    last.append(n - 1)
  full = np.asarray(qwen3.forward(cfg, params, full_tokens, full_mask))
  expected = np.stack([full[i, last[i]:last[i] + steps + 1] for i in range(b)])
  assert np.abs(step_logits - expected).max() < FP32_TOL


def test_remat_policies_do_not_change_logits_or_grads():
  cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = qwen3.init_params(cfg, jax.random.key(1), std=0.2)
  tokens = np.random.RandomState(1).randint(0, 64, (2, 6))

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(qwen3.forward(c, p, tokens))[..., 0])

  base_loss, base_grads = jax.value_and_grad(loss)(params, cfg)
  for policy in ("full", "dots"):
    c = qwen3.Qwen3Config(**{**cfg.__dict__, "remat": policy})
    value, grads = jax.value_and_grad(loss)(params, c)
    np.testing.assert_allclose(value, base_loss, rtol=1e-6)
    # Recomputation may reorder fp32 sums (on a GPU: 1.1e-6 on a 0.17 gradient, measured on an H200).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, base_grads)


def _plain_dot(eq, x, w, out_dtype=None):
  """qwen3._dot without its custom backward: what autodiff of the einsum + cast computes."""
  return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


@pytest.mark.parametrize("eq,x_shape,w_shape", [
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4)),
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 6)),
    ("btd,vd->btv", (2, 5, 6), (7, 6)),
    ("bkgtd,bskd->bkgts", (2, 3, 2, 5, 4), (2, 5, 3, 4)),
    ("bkgts,bskd->bkgtd", (2, 3, 2, 5, 5), (2, 5, 3, 4)),
])
def test_dot_backward_equals_autodiff(eq, x_shape, w_shape):
  rng = np.random.RandomState(0)
  x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
  out, vjp = jax.vjp(lambda x, w: qwen3._dot(eq, x, w), x, w)
  ref_out, ref_vjp = jax.vjp(lambda x, w: _plain_dot(eq, x, w), x, w)
  ct = rng.normal(size=out.shape).astype(np.float32)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6)
  for got, want in zip(vjp(ct), ref_vjp(ct)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # bf16 operands, bf16 output: the cotangent is bf16 already, so the bf16 backward loses nothing either.
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  ctb = jnp.asarray(ct, jnp.bfloat16)
  got = jax.vjp(lambda x, w: qwen3._dot(eq, x, w), xb, wb)[1](ctb)
  want = jax.vjp(lambda x, w: _plain_dot(eq, x, w), xb, wb)[1](ctb)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2**-7, atol=1e-6)
  # bf16 operands, fp32 output (scores, logits): the fp32 cotangent is rounded to bf16 first, nothing else.
  got = jax.vjp(lambda x, w: qwen3._dot(eq, x, w, jnp.float32), xb, wb)[1](jnp.asarray(ct))
  want = jax.vjp(lambda x, w: _plain_dot(eq, x, w, jnp.float32), xb, wb)[1](jnp.asarray(ctb, jnp.float32))
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2**-7, atol=1e-6)


def test_model_grads_equal_autodiff_fp32(monkeypatch):
  """Every matmul of the model (projections, attention, LoRA, head) through the custom backward gives
  autodiff's gradients, for the frozen weights and for the adapters."""
  from models import lora
  cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
  params = qwen3.init_params(cfg, jax.random.key(1), std=0.2)
  adapters = jax.tree.map(lambda a: a + 0.05, lora.init_adapters(cfg, lora.LoraConfig(rank=4, lm_head=True), jax.random.key(2)))
  tokens = np.random.RandomState(1).randint(0, 64, (2, 6))

  def loss(p, a):
    return jnp.mean(jax.nn.log_softmax(qwen3.forward(cfg, p, tokens, adapters=a, lora_scale=2.0))[..., 3])

  got = jax.grad(loss, argnums=(0, 1))(params, adapters)
  monkeypatch.setattr(qwen3, "_dot", _plain_dot)
  want = jax.grad(loss, argnums=(0, 1))(params, adapters)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_block_causal_attention_equals_dense_attention_and_its_gradient():
  b, t, h, kv, dh = 2, 256, 4, 2, 8
  assert qwen3.causal_block(t) == 64 and qwen3.causal_block(96) == 0
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, dh)), jnp.float32) for n in (h, kv, kv))
  real = np.arange(t)[None] >= np.array([[0], [37]])           # row 1 left-padded
  segments = np.where(np.arange(t) < 150, 0, 1)[None]            # two packed segments
  mask = np.tril(np.ones((t, t), bool))[None] & real[:, None] & (segments[:, :, None] == segments[:, None])
  mask |= np.eye(t, dtype=bool)[None]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask)))
  np.testing.assert_allclose(qwen3.causal_attention(q, k, v, mask), qwen3.attention(q, k, v, mask), atol=1e-5)
  grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (qwen3.causal_attention, qwen3.attention)]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), *grads)
  # The blocks skip keys past their end: with a mask that is not causal the two differ (so the check can fail).
  full = np.ones((b, t, t), bool)
  assert float(jnp.max(jnp.abs(qwen3.causal_attention(q, k, v, full) - qwen3.attention(q, k, v, full)))) > 0.1


@pytest.mark.parametrize("text, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n", False),                    # AVX2 Zen 3
    ("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n", True),                  # Zen 4, Cooper Lake
    ("processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n", True),            # Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),                   # Arm v8.6
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),                  # Arm without BF16
    ("processor\t: 0\n", True),                                                       # no flags: unknown
])
def test_cpu_bf16_matmul_detection(tmp_path, text, native):
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  assert qwen3._cpu_has_bf16_matmul(str(path)) is native
  assert qwen3._cpu_has_bf16_matmul(str(tmp_path / "missing")) is True


def test_bf16_dots_override_is_checked(monkeypatch):
  qwen3.upcast_dots.cache_clear()
  try:
    monkeypatch.setenv("JOPD_BF16_DOTS", "fp16")
    with pytest.raises(ValueError, match=r"^JOPD_BF16_DOTS='fp16'; expected 'auto', 'native' or 'fp32'$"):
      qwen3.upcast_dots()
    for mode, want in (("fp32", True), ("native", False)):
      monkeypatch.setenv("JOPD_BF16_DOTS", mode)
      qwen3.upcast_dots.cache_clear()
      assert qwen3.upcast_dots() is want
  finally:
    monkeypatch.delenv("JOPD_BF16_DOTS")
    qwen3.upcast_dots.cache_clear()


@pytest.mark.parametrize("eq, x_shape, w_shape", [
    ("btd,df->btf", (2, 33, 64), (64, 96)),
    ("bkgtd,bskd->bkgts", (2, 3, 2, 17, 16), (2, 17, 3, 16)),
])
def test_upcast_bf16_dots_equal_native_ones_and_their_gradients(monkeypatch, eq, x_shape, w_shape):
  """A bf16 x bf16 product is exact in fp32 and both ways accumulate in fp32: upcasting the operands may change
  only the order of the sums (~fp32 epsilon), forward and backward; inside `native_dots` nothing is upcast."""
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.bfloat16)

  def run(upcast: bool):
    monkeypatch.setattr(qwen3, "upcast_dots", lambda: upcast)
    f = lambda x, w: qwen3._dot(eq, x, w, jnp.float32)
    out, vjp = jax.vjp(f, x, w)
    ct = jnp.asarray(np.random.RandomState(4).normal(size=out.shape), jnp.float32)
    hlo = jax.jit(f).lower(x, w).as_text()
    return (out, *vjp(ct)), hlo

  (out_n, dx_n, dw_n), hlo_n = run(False)
  (out_u, dx_u, dw_u), hlo_u = run(True)
  # The dots' operand types.
  assert "xbf16>, tensor<" in hlo_n and "xf32>) -> tensor<" not in hlo_n and "xf32>) -> tensor<" in hlo_u
  np.testing.assert_allclose(out_u, out_n, rtol=1e-5, atol=1e-4)
  for got, want in ((dx_u, dx_n), (dw_u, dw_n)):
    assert got.dtype == want.dtype == jnp.bfloat16
    # Rounded to bf16 after the fp32 sums: at most one bf16 ulp apart.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2**-7, atol=1e-3)
  monkeypatch.setattr(qwen3, "upcast_dots", lambda: True)
  assert qwen3.wide(x).dtype == jnp.float32 and qwen3.wide(x.astype(jnp.int32)).dtype == jnp.int32
  with qwen3.native_dots():
    assert qwen3.wide(x).dtype == jnp.bfloat16
  assert qwen3.wide(x).dtype == jnp.float32
