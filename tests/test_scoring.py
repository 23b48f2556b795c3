"""Scoring: chunked logprobs equal a plain forward (privileged contexts, temperature, chunk sizes that do not
divide the length), values, entropy and gradients equal the unchunked math, a (2,1,4) mesh, errors, and buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd import buckets, scoring
from models import qwen3

CFG = qwen3.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8,
                        num_kv_heads=4, head_dim=8, rope_theta=10000.0)


@pytest.fixture(scope="module")
def params():
  return jax.jit(qwen3.init_params, static_argnums=0)(CFG, jax.random.key(0), std=0.3)


_forward = jax.jit(qwen3.forward, static_argnums=0)


def _plain(params, ctx, cont, temperature=1.0, adapters=None):
  """log_softmax of one unpadded forward over context + continuation, gathered at the continuation."""
  seq = np.asarray(list(ctx) + list(cont))[None]
  logits = _forward(CFG, params, jnp.asarray(seq), adapters=adapters)[0] / temperature
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return logp[np.arange(len(ctx) - 1, len(seq[0]) - 1), seq[0, len(ctx):]]


STUDENT_PROMPTS = [[5, 6, 7], [8, 9]]
TEACHER_CONTEXTS = [[1, 2, 3, 4, 60, 61, 62, 5, 6, 7], [8]]  # privileged prompts: longer, or shorter
COMPLETIONS = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_privileged_context_equals_plain_forward(params, chunk_size):
  got = scoring.token_logprobs(CFG, params, TEACHER_CONTEXTS, COMPLETIONS, chunk_size=chunk_size)
  student = scoring.token_logprobs(CFG, params, STUDENT_PROMPTS, COMPLETIONS, chunk_size=chunk_size)
  for i, (ctx, cont) in enumerate(zip(TEACHER_CONTEXTS, COMPLETIONS)):
    assert got[i].shape == (len(cont),) and got[i].dtype == np.float32
    np.testing.assert_allclose(got[i], _plain(params, ctx, cont), atol=1e-5, err_msg=f"row {i}")
    np.testing.assert_allclose(student[i], _plain(params, STUDENT_PROMPTS[i], cont), atol=1e-5)
    assert np.abs(got[i] - student[i]).max() > 1e-3  # the context really conditions the scores


def test_temperature_batching_and_empty_continuation(params):
  ctxs, conts = TEACHER_CONTEXTS + [[3]], COMPLETIONS + [[]]
  got = scoring.token_logprobs(CFG, params, ctxs, conts, temperature=0.7, batch_size=2)
  for ctx, cont, lp in zip(ctxs[:2], conts[:2], got):
    np.testing.assert_allclose(lp, _plain(params, ctx, cont, temperature=0.7), atol=1e-5)
  assert got[2].shape == (0,)
  greedy = scoring.token_logprobs(CFG, params, ctxs[:1], conts[:1], temperature=0.0)
  np.testing.assert_allclose(greedy[0], _plain(params, ctxs[0], conts[0]), atol=1e-5)


def test_sequence_logprobs_and_entropy_values(params):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  tokens = jax.random.randint(k1, (3, 11), 0, CFG.vocab_size)
  mask = jnp.arange(11)[None] < jnp.array([[11], [7], [4]])
  targets = jnp.roll(tokens, -1, axis=1)
  adapters = {"layers": {"up": {"a": 0.2 * jax.random.normal(k2, (2, 32, 4)),
                                "b": 0.2 * jax.random.normal(k3, (2, 4, 48))}}}
  lp, ent = jax.jit(lambda p, a: scoring.sequence_logprobs(
      CFG, p, tokens, mask, targets, adapters=a, lora_scale=0.5, temperature=0.8, chunk_size=4))(params, adapters)
  logits = _forward(CFG, params, tokens, mask, adapters=adapters, lora_scale=0.5) / 0.8
  logp = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(lp, jnp.where(mask, jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], 0),
                             atol=1e-5)
  np.testing.assert_allclose(ent, jnp.where(mask, -jnp.sum(jnp.exp(logp) * logp, -1), 0), atol=1e-5)


def test_chunked_head_gradients_equal_unchunked(params):
  """The chunked, rematerialised vocab projection differentiates like the plain log_softmax (the trainer's l_t)."""
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  h = jax.random.normal(k1, (2, 7, 32))
  targets = jax.random.randint(k2, (2, 7), 0, CFG.vocab_size)
  head = {"lm_head": {"a": 0.2 * jax.random.normal(k3, (32, 4)), "b": 0.2 * jax.random.normal(k2, (4, 97))}}
  weights = jax.random.normal(k3, (2, 7))

  def chunked(p, a, h):
    lp, ent = scoring.logprobs_from_hidden(p, h, targets, adapters=a, lora_scale=0.5, temperature=0.8,
                                           chunk_size=3)
    return jnp.sum(weights * lp) + 0.1 * jnp.sum(ent)

  def plain(p, a, h):
    logp = jax.nn.log_softmax(qwen3.logits_from_hidden(p, h, adapters=a, lora_scale=0.5) / 0.8, axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return jnp.sum(weights * lp) + 0.1 * jnp.sum(-jnp.sum(jnp.exp(logp) * logp, -1))

  g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(params, head, h)
  g_ref = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(params, head, h)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g[1][1]["lm_head"]["b"]).max()) > 1e-3 and float(jnp.abs(g[1][0]["lm_head"]).max()) > 1e-3


def test_mesh_2_1_4_matches_one_device(params):
  mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  one = scoring.token_logprobs(CFG, params, TEACHER_CONTEXTS * 2, COMPLETIONS * 2)
  many = scoring.token_logprobs(CFG, params, TEACHER_CONTEXTS * 2, COMPLETIONS * 2, mesh=mesh)
  for x, y in zip(one, many):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_errors_name_the_row(params):
  with pytest.raises(ValueError, match=r"contexts\[1\] is empty"):
    scoring.token_logprobs(CFG, params, [[1], []], [[2], [3]])
  with pytest.raises(ValueError, match=r"continuations\[0\]\[1\] = 97 is outside the vocabulary \[0, 97\)"):
    scoring.token_logprobs(CFG, params, [[1]], [[2, 97]])
  with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
    scoring.token_logprobs(CFG, params, [[1], [2]], [[3]])


def test_buckets():
  ladder = [buckets.length_bucket(n) for n in range(1, 400)]
  assert sorted(set(ladder)) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
  assert all(b >= n and b <= max(16, 1.5 * n) for n, b in zip(range(1, 400), ladder))
  assert [buckets.batch_bucket(n, 2) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 16]
  tokens, mask = buckets.pad_rows([[1, 2], [3]], 3, 4, left=True)
  np.testing.assert_array_equal(tokens, [[0, 0, 1, 2], [0, 0, 0, 3], [0, 0, 0, 0]])
  np.testing.assert_array_equal(mask.sum(1), [2, 1, 0])
  assert scoring.auto_chunk_size(16, 32000, 512) == 128
  assert scoring.auto_chunk_size(1, 97, 11) == 16


def test_tied_head_logits_equal_model_logits():
  """The tied-head shortcut (contracting the [V, D] embedding directly) computes qwen3's logits, LoRA included."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  params = {"embed": jax.random.normal(k1, (97, 32))}  # tied: no 'lm_head' weight
  head = {"lm_head": {"a": 0.3 * jax.random.normal(k2, (32, 4)), "b": 0.3 * jax.random.normal(k3, (4, 97))}}
  h = jax.random.normal(k3, (2, 5, 32))
  for adapters in (None, head):
    got = jax.jit(lambda p, a: scoring.logits(p, h, adapters=a, lora_scale=0.5))(params, adapters)
    want = qwen3.logits_from_hidden(params, h, adapters=adapters, lora_scale=0.5)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
