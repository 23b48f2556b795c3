"""Sampler: greedy parity with transformers, logprobs that match scoring, the sampled distribution, stop/length,
bucketing without recompiles, truncation, unmerged adapters and a (2,1,4) mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from jopd import sampler, scoring
from models import hf, qwen3
from tests import helpers

PROMPTS = [[3, 17, 45, 9, 41], [7, 8, 20, 5, 36, 40, 31, 2, 29], [11, 12]]
VOCAB = 48  # small, so the sampled-distribution test can bound a total-variation distance with few samples


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  # 8 heads / 4 KV heads so the (2,1,4) mesh test shards the cache's heads; one model keeps compiles few.
  model = helpers.random_hf_model(seed=3, std=0.3, vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4,
                                  head_dim=16)
  cfg, params = hf.load_pretrained(helpers.save_hf_model(model, tmp_path_factory.mktemp("m")), dtype=jnp.float32)
  return model, cfg, params


def _tv(counts, probs):
  return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def _tv_bound(probs, n):
  """Twice the expected TV distance of an n-sample empirical distribution from `probs`
  (E|f_i - p_i| ~ sqrt(2 p_i (1 - p_i) / (pi n))); the TV's spread is far smaller than its mean."""
  return 2 * 0.5 * np.sum(np.sqrt(2 * probs * (1 - probs) / (np.pi * n)))


def test_greedy_matches_transformers_generate(hf_pair):
  model, cfg, params = hf_pair
  res = sampler.sample(cfg, params, PROMPTS, max_new_tokens=32, temperature=0.0, rng=jax.random.key(0))
  for i, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                           pad_token_id=0)
    want = out[0, len(prompt):].numpy()
    np.testing.assert_array_equal(res.tokens[i], want, err_msg=f"prompt {i}")
    assert res.finish_reasons[i] == "length"
    # Meaningful only if no argmax was a near-tie: the top-2 gaps along the trajectory must dwarf the ~1e-6
    # fp32 difference between the two implementations' logits.
    full = np.concatenate([prompt, want])[None]
    top2 = np.sort(helpers.hf_logits(model, full)[0, len(prompt) - 1:-1], axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4
  # Greedy logprob convention: log_softmax of the unscaled logits, i.e. token_logprobs at temperature 1.
  lp = scoring.token_logprobs(cfg, params, PROMPTS, res.tokens, temperature=1.0)
  for a, b in zip(res.logprobs, lp):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_scoring(hf_pair, temperature):
  _, cfg, params = hf_pair
  res = sampler.sample(cfg, params, PROMPTS, max_new_tokens=32, temperature=temperature, rng=jax.random.key(5))
  lp = scoring.token_logprobs(cfg, params, PROMPTS, res.tokens, temperature=temperature)
  for i, (a, b) in enumerate(zip(res.logprobs, lp)):
    assert a.shape == (32,) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"row {i}")
  if temperature != 1.0:  # the temperature really enters the recorded logprob
    plain = scoring.token_logprobs(cfg, params, PROMPTS, res.tokens, temperature=1.0)
    assert max(np.abs(a - b).max() for a, b in zip(res.logprobs, plain)) > 1e-2


def test_temperature_one_sampling_matches_softmax():
  """n rows of one prompt: the first draws (prefill program) are iid from softmax(logits); the second draws
  (decode loop) have E[one_hot(y2)] = mean over rows of p(. | prompt, y1). Both histograms must lie within twice
  the expected TV distance of an n-sample histogram, a bound that rejects temperature 0.7."""
  cfg = qwen3.Qwen3Config(vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16)
  params = jax.jit(qwen3.init_params, static_argnums=0)(cfg, jax.random.key(0), std=0.4)
  forward = jax.jit(qwen3.forward, static_argnums=0)
  prompt, n = [1, 5, 9], 4096
  res = sampler.sample(cfg, params, [prompt] * n, max_new_tokens=2, temperature=1.0, rng=jax.random.key(7))
  toks = np.stack(res.tokens)
  logits = forward(cfg, params, jnp.asarray([prompt]))[0, -1]
  p1 = np.asarray(jax.nn.softmax(logits), np.float64)
  bound = _tv_bound(p1, n)
  assert bound < 0.05
  assert _tv(np.bincount(toks[:, 0], minlength=16), p1) < bound
  assert 0.5 * np.abs(p1 - np.asarray(jax.nn.softmax(logits / 0.7))).sum() > 2 * bound
  ctx = np.concatenate([np.tile(prompt, (16, 1)), np.arange(16)[:, None]], axis=1)
  p2_given_y1 = np.asarray(jax.nn.softmax(forward(cfg, params, jnp.asarray(ctx))[:, -1]), np.float64)
  expected = p2_given_y1[toks[:, 0]].mean(0)
  assert _tv(np.bincount(toks[:, 1], minlength=16), expected) < _tv_bound(expected, n)


def test_stop_tokens_length_and_no_padding(hf_pair):
  _, cfg, params = hf_pair
  prompts, n = PROMPTS, 28  # 28 new tokens: inside the 32 bucket, so the buffers hold padding past the limit
  kw = dict(max_new_tokens=n, temperature=1.0, rng=jax.random.key(11))
  base = sampler.sample(cfg, params, prompts, **kw)
  assert all(len(t) == n for t in base.tokens) and base.finish_reasons == ["length"] * 3
  # Stop on row 0's 4th token (same rng, so the same draws up to the stop).
  stops = [int(base.tokens[0][3]), VOCAB - 1]
  res = sampler.sample(cfg, params, prompts, stop_token_ids=stops, **kw)
  for i in range(3):
    hits = np.flatnonzero(np.isin(base.tokens[i], stops))
    if hits.size:
      end = hits[0] + 1
      assert res.finish_reasons[i] == "stop"
    else:
      end = n
      assert res.finish_reasons[i] == "length"
    np.testing.assert_array_equal(res.tokens[i], base.tokens[i][:end])  # stop token kept, nothing after it
    assert len(res.logprobs[i]) == end
    np.testing.assert_allclose(res.logprobs[i], base.logprobs[i][:end], atol=1e-6)
  assert res.finish_reasons[0] == "stop" and len(res.tokens[0]) <= 4


def test_same_bucket_does_not_recompile(hf_pair):
  _, cfg, params = hf_pair
  compiles = []

  def listener(name, *_, **__):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)
  sampler.sample(cfg, params, [[1, 2, 3], [4, 5], [6]], max_new_tokens=26, temperature=1.0,
                 stop_token_ids=[3], rng=jax.random.key(0))
  before = sampler.compile_count()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    res = sampler.sample(cfg, params, [[1] * 11, [2, 3, 4, 5, 6], [7] * 16, [8]], max_new_tokens=31,
                         temperature=0.5, top_k=5, top_p=0.9, stop_token_ids=[3, 4], rng=jax.random.key(1))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sampler.compile_count() == before
  assert compiles == []  # nothing at all was compiled: no stray host-side jnp ops either
  assert all(len(t) <= 31 for t in res.tokens) and len(res.tokens) == 4
  # The listener is live: a new program is seen.
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 3 + 1)(np.ones(7))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles


def _np_truncate(x, k, p):
  order = np.argsort(-x)
  keep = np.zeros_like(x, bool)
  keep[order[:k]] = True
  probs = np.exp(x[order[:k]] - x[order[0]])
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  nucleus = order[:k][before < p]
  out = np.full_like(x, -np.inf)
  out[nucleus] = x[nucleus]
  return out


def test_top_k_top_p_truncation_and_logprob():
  logits = np.asarray(jax.random.normal(jax.random.key(2), (6, 50)), np.float32) * 3
  sp = sampler.SamplingParams(np.float32(0.8), np.int32(7), np.float32(0.6))
  fn = jax.jit(sampler.sample_token)
  for seed in range(20):
    tok, lp = fn(jnp.asarray(logits), jax.random.key(seed), sp)
    for r in range(6):
      ref = _np_truncate(logits[r] / 0.8, 7, 0.6)
      assert np.isfinite(ref[tok[r]]), f"row {r}: token {tok[r]} outside the top-k/top-p set"
      ref_lp = ref[tok[r]] - np.log(np.exp(ref[np.isfinite(ref)]).sum())
      np.testing.assert_allclose(lp[r], ref_lp, atol=1e-5)
  # top_k=1 is greedy in effect, with logprob 0.
  tok, lp = fn(jnp.asarray(logits), jax.random.key(0), sp._replace(top_k=np.int32(1)))
  np.testing.assert_array_equal(tok, logits.argmax(-1))
  np.testing.assert_allclose(lp, 0.0, atol=1e-6)


def test_unmerged_adapters_match_merged_weights_and_layer_loops_agree(hf_pair):
  """Unrolled layer loop (CPU default) with unmerged adapters == the scan loop (qwen3.decode_step) on merged
  weights: covers adapter slicing per layer and the two decode implementations at once."""
  _, cfg, params = hf_pair
  ka, kb = jax.random.split(jax.random.key(9))
  a = 0.5 * jax.random.normal(ka, (cfg.num_layers, cfg.hidden_size, 4))
  b = 0.5 * jax.random.normal(kb, (cfg.num_layers, 4, cfg.num_heads, cfg.head_dim))
  adapters = {"layers": {"q": {"a": a, "b": b}}}
  merged = jax.tree.map(lambda x: x, params)
  merged["layers"]["q"] = params["layers"]["q"] + 0.5 * jnp.einsum("ldr,lrhk->ldhk", a, b)
  kw = dict(max_new_tokens=28, temperature=1.0, rng=jax.random.key(3))
  res = sampler.sample(cfg, params, PROMPTS, adapters=adapters, lora_scale=0.5, **kw)
  ref = sampler.sample(cfg, merged, PROMPTS, layer_loop="scan", **kw)
  plain = sampler.sample(cfg, params, PROMPTS, **kw)
  for x, y, tx, ty in zip(res.logprobs, ref.logprobs, res.tokens, ref.tokens):
    np.testing.assert_array_equal(tx, ty)
    np.testing.assert_allclose(x, y, atol=1e-4)
  assert any(not np.allclose(x, y, atol=1e-2) for x, y in zip(res.logprobs, plain.logprobs))


def test_mesh_2_1_4_matches_one_device(hf_pair):
  _, cfg, params = hf_pair
  mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
  # Rows on ('data','fsdp'), the cache's KV heads (4) on 'tensor' (4): the layout really is distributed.
  assert sampler._cache_shardings(cfg, mesh, True)["k"][0].spec == P(("data", "fsdp"), "tensor", None, None)
  assert sampler._cache_shardings(cfg, mesh, False)["k"].spec == P(None, ("data", "fsdp"), None, "tensor", None)
  for temperature in (0.0, 1.0):
    kw = dict(max_new_tokens=28, temperature=temperature, stop_token_ids=[3], rng=jax.random.key(4))
    one = sampler.sample(cfg, params, prompts, **kw)
    many = sampler.sample(cfg, params, prompts, mesh=mesh, **kw)
    assert one.finish_reasons == many.finish_reasons
    for x, y, lx, ly in zip(one.tokens, many.tokens, one.logprobs, many.logprobs):
      np.testing.assert_array_equal(x, y)
      np.testing.assert_allclose(lx, ly, atol=1e-5)


@pytest.mark.parametrize("unrolled", [False, True])
def test_decode_loop_keeps_bf16_dots_where_prefill_upcasts(monkeypatch, unrolled):
  """Where `qwen3.upcast_dots` holds (CPUs without bf16 matmul units), the prefill multiplies bf16 weights as
  fp32 but the decode loop does not: upcast, it would convert every weight once per token."""
  from jopd import config as config_lib, memory, plan, update
  from jopd import mesh as mesh_lib
  from models import lora
  monkeypatch.setattr(qwen3, "upcast_dots", lambda: True)
  # Sizes no other test traces, so no program traced under the other policy is reused.
  cfg = qwen3.Qwen3Config(vocab_size=301, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=20, tie_word_embeddings=True)
  w = plan.Workload(cfg, cfg, lora.LoraConfig(rank=4), jnp.bfloat16, memory.SampleShape(2, 8, 8),
                    memory.ScoreShape(2, 16, 16), memory.TrainShape(2, 16), update.make_optimizer(config_lib.opd(), 10))
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  prefill, decode = plan.lower_sample(w, mesh, unrolled=unrolled)

  def dot_operand_types(lowered):
    lines = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
    return {line.rsplit(": (", 1)[1].split(")")[0] for line in lines}

  prefill_types, decode_types = dot_operand_types(prefill), dot_operand_types(decode)
  assert prefill_types and all("bf16" not in t for t in prefill_types), prefill_types
  # Every weight dot of the loop reads bf16 (the fp32 LoRA factors meet fp32 operands, as without upcasting).
  assert any("x40xbf16>, tensor<40x" in t for t in decode_types), decode_types
  weight_dots = [t for t in decode_types if not t.endswith("x4xf32>")]   # not x @ A [40, 4] (rank 4)
  assert all("xf32>, tensor<40x" not in t for t in weight_dots), decode_types
