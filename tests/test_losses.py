"""Tests for jopd/losses.py: the loss identities at the sampling policy, discounting, the ratio cap, and SFT
cross-entropy reductions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd import losses

B, T, D, V = 3, 7, 5, 11
# Row 0: 2 prompt tokens, 4 completion, 1 pad; row 1: 1 prompt, 6 completion; row 2: 3 prompt, 2 completion, 2 pad.
MASK_BT = np.array([[0, 0, 1, 1, 1, 1, 0],
                    [0, 1, 1, 1, 1, 1, 1],
                    [0, 0, 0, 1, 1, 0, 0]], np.float32)


def _problem(seed=0):
  """A tiny differentiable policy: l_t = log_softmax(x_t @ W)[y_t]."""
  rng = np.random.default_rng(seed)
  x_btd = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  tokens_bt = jnp.asarray(rng.integers(0, V, size=(B, T)))
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)

  def logprobs_fn(w):
    logp_btv = jax.nn.log_softmax(x_btd @ w, axis=-1)
    return jnp.take_along_axis(logp_btv, tokens_bt[..., None], axis=-1)[..., 0]

  teacher_bt = logprobs_fn(w + jnp.asarray(rng.normal(size=(D, V)), jnp.float32))
  return w, logprobs_fn, teacher_bt


@pytest.mark.parametrize("discount", [0.0, 0.7])
@pytest.mark.parametrize("normalization", ["sum", "token_mean"])
def test_loss_value_and_gradient_at_sampling_policy(discount, normalization):
  w, logprobs_fn, teacher_bt = _problem()
  sampling_bt = logprobs_fn(w)  # params == sampling params
  # Garbage at padding/prompt positions must not matter.
  teacher_bt = jnp.where(MASK_BT > 0, teacher_bt, -jnp.inf)
  coef = 0.5
  adv_bt = losses.advantages(sampling_bt, teacher_bt, MASK_BT, coef, discount)
  n_tokens = MASK_BT.sum()
  z = 1.0 if normalization == "sum" else n_tokens

  def loss_fn(w):
    return losses.importance_sampling_loss(logprobs_fn(w), sampling_bt, adv_bt, MASK_BT, 20.0, normalization)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(w)
  if discount == 0.0:
    summed_reverse_kl = float(jnp.sum(jnp.where(MASK_BT > 0, sampling_bt - teacher_bt, 0.0)))
    np.testing.assert_allclose(float(loss), coef * summed_reverse_kl / z, rtol=1e-5)
  else:
    np.testing.assert_allclose(float(loss), -float(jnp.sum(adv_bt)) / z, rtol=1e-5)

  # Gradient of the explicit expression -sum m_t A_t l_t (A constant).
  explicit = lambda w: -jnp.sum(MASK_BT * adv_bt * logprobs_fn(w)) / z
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(explicit)(w)), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grad).max()) > 1e-3  # the identity is not vacuous
  np.testing.assert_allclose(float(metrics["sampler_trainer_kl"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(metrics["ratio/mean"]), 1.0, atol=1e-6)
  assert float(metrics["tokens"]) == n_tokens


def test_advantages_gradient_is_stopped():
  """The loss must not differentiate through A even when A is computed from the trainer's own logprobs."""
  w, logprobs_fn, teacher_bt = _problem(1)
  sampling_bt = logprobs_fn(w)

  def loss_fn(w):
    adv_bt = losses.advantages(logprobs_fn(w), teacher_bt, MASK_BT, 1.0, 0.0)
    return losses.importance_sampling_loss(logprobs_fn(w), sampling_bt, adv_bt, MASK_BT, None)[0]

  adv_bt = losses.advantages(sampling_bt, teacher_bt, MASK_BT, 1.0, 0.0)
  explicit = lambda w: -jnp.sum(MASK_BT * adv_bt * logprobs_fn(w))
  np.testing.assert_allclose(np.asarray(jax.grad(loss_fn)(w)), np.asarray(jax.grad(explicit)(w)), rtol=1e-5,
                             atol=1e-6)


def test_discounting_hand_computed_and_confined_to_completion():
  # One row: prompt, prompt, 3 completion tokens, padding, padding.
  mask_bt = np.array([[0, 0, 1, 1, 1, 0, 0]], np.float32)
  sampling_bt = np.array([[9.0, 9.0, -1.0, -2.0, -0.5, 9.0, 9.0]], np.float32)
  teacher_bt = np.array([[0.0, 0.0, -2.0, -1.0, -2.5, 0.0, 0.0]], np.float32)
  # r = [1, -1, 2] on the completion; a = -2 r = [-2, 2, -4]; g = 0.5:
  # A_4 = -4; A_3 = 2 + 0.5 * -4 = 0; A_2 = -2 + 0.5 * 0 = -2.
  adv = np.asarray(losses.advantages(sampling_bt, teacher_bt, mask_bt, 2.0, 0.5))
  np.testing.assert_allclose(adv, [[0, 0, -2.0, 0.0, -4.0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.advantages(sampling_bt, teacher_bt, mask_bt, 2.0, 0.0)),
                             [[0, 0, -2.0, 2.0, -4.0, 0, 0]], atol=1e-6)


def test_discounting_matches_loop_and_ignores_outside_values():
  rng = np.random.default_rng(3)
  values_bt = rng.normal(size=(B, T)).astype(np.float32)
  # A gap inside row 1 (a tool/prompt token between two completion segments) is skipped, not counted.
  mask_bt = MASK_BT.copy()
  mask_bt[1, 3] = 0
  g = 0.8
  out = np.asarray(losses.discounted_future_sum_bt(values_bt, mask_bt, g))
  expected = np.zeros_like(values_bt)
  for b in range(B):
    acc = 0.0
    for t in reversed(range(T)):
      if mask_bt[b, t]:
        acc = values_bt[b, t] + g * acc
        expected[b, t] = acc
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # Huge values outside the mask change nothing.
  noisy_bt = np.where(mask_bt > 0, values_bt, 1e6).astype(np.float32)
  np.testing.assert_allclose(np.asarray(losses.discounted_future_sum_bt(noisy_bt, mask_bt, g)), expected,
                             rtol=1e-5, atol=1e-6)


def test_discounting_rejects_out_of_range_factor():
  with pytest.raises(ValueError, match="kl_discount_factor"):
    losses.advantages(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), 1.0, 1.5)


def test_ratio_cap_clips_value_and_gradient():
  mask_bt = np.ones((1, 3), np.float32)
  sampling_bt = jnp.zeros((1, 3))
  adv_bt = jnp.ones((1, 3))
  logprobs_bt = jnp.array([[0.1, 3.0, -3.0]])
  cap = 1.0
  fn = lambda l: losses.importance_sampling_loss(l, sampling_bt, adv_bt, mask_bt, cap)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logprobs_bt)
  expected = -(np.exp(0.1) + np.exp(1.0) + np.exp(-1.0))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), [[-np.exp(0.1), 0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(float(metrics["ratio/clipped_frac"]), 2 / 3, rtol=1e-6)
  # sampler_trainer_kl uses the raw (unclipped) log-ratio: mean(ls - l).
  np.testing.assert_allclose(float(metrics["sampler_trainer_kl"]), -0.1 / 3, rtol=1e-5)


def test_token_mean_with_global_token_count_matches_unsplit_batch():
  w, logprobs_fn, teacher_bt = _problem(2)
  sampling_bt = logprobs_fn(w) + 0.1  # a stale sampler: ratios != 1
  adv_bt = losses.advantages(sampling_bt, teacher_bt, MASK_BT, 1.0, 0.0)
  full = lambda w: losses.importance_sampling_loss(logprobs_fn(w), sampling_bt, adv_bt, MASK_BT, 5.0,
                                                   "token_mean")[0]

  def split(w):
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
      total += losses.importance_sampling_loss(logprobs_fn(w)[rows], sampling_bt[rows], adv_bt[rows],
                                               MASK_BT[rows], 5.0, "token_mean", token_count=MASK_BT.sum())[0]
    return total

  np.testing.assert_allclose(float(split(w)), float(full(w)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(split)(w)), np.asarray(jax.grad(full)(w)), rtol=1e-5, atol=1e-6)


def test_cross_entropy_reductions():
  logprobs_bt = np.log(np.array([[0.5, 0.25, 0.9, 0.1],
                                 [0.2, 0.4, 0.6, 0.8],
                                 [0.3, 0.3, 0.3, 0.3]], np.float32))
  weights_bt = np.array([[0, 1, 1, 0],
                         [1, 1, 1, 1],
                         [0, 0, 0, 0]], np.float32)  # the third example has no weighted token
  nll = -logprobs_bt
  loss_sum, m = losses.cross_entropy_loss(logprobs_bt, weights_bt, "sum")
  np.testing.assert_allclose(float(loss_sum), (nll * weights_bt).sum(), rtol=1e-6)
  loss_mean, _ = losses.cross_entropy_loss(logprobs_bt, weights_bt, "mean")
  per_example = [nll[0, 1:3].mean(), nll[1].mean()]
  np.testing.assert_allclose(float(loss_mean), np.mean(per_example), rtol=1e-6)
  np.testing.assert_allclose(float(m["nll"]), (nll * weights_bt).sum() / 6, rtol=1e-6)
  assert float(m["tokens"]) == 6
  with pytest.raises(ValueError, match="reduction"):
    losses.cross_entropy_loss(logprobs_bt, weights_bt, "token_mean")


def test_cross_entropy_mean_over_packed_conversations():
  # Packed rows: an example is a segment (conversation), not a row. Row 0 holds conversations of 2 and 3
  # weighted tokens, row 1 one of 1 token and one with no weighted token (it counts for nothing), then padding.
  logprobs_bt = np.log(np.array([[0.5, 0.25, 0.9, 0.1, 0.4, 0.7],
                                 [0.2, 0.4, 0.6, 0.8, 0.3, 0.3]], np.float32))
  weights_bt = np.array([[1, 1, 0, 1, 1, 1],
                         [1, 0, 0, 0, 0, 0]], np.float32)
  segment_ids_bt = np.array([[1, 1, 1, 2, 2, 2],
                             [1, 1, 2, 2, 0, 0]], np.int32)
  nll = -logprobs_bt.astype(np.float64)
  per_conversation = [nll[0, :2].mean(), nll[0, 3:].mean(), nll[1, 0]]
  loss, m = losses.cross_entropy_loss(logprobs_bt, weights_bt, "mean", segment_ids_bt=segment_ids_bt)
  np.testing.assert_allclose(float(loss), np.mean(per_conversation), rtol=1e-6)
  np.testing.assert_allclose(float(m["nll_x_tokens"]), (nll * weights_bt).sum(), rtol=1e-6)
  # Per row it would be the mean of 2 row means, a different number.
  by_row, _ = losses.cross_entropy_loss(logprobs_bt, weights_bt, "mean")
  assert abs(float(by_row) - np.mean(per_conversation)) > 1e-3
  # Micro-batches of one row each, summed, with the whole batch's conversation count as divisor.
  split = sum(float(losses.cross_entropy_loss(logprobs_bt[r:r + 1], weights_bt[r:r + 1], "mean", num_examples=3,
                                              segment_ids_bt=segment_ids_bt[r:r + 1])[0]) for r in range(2))
  np.testing.assert_allclose(split, np.mean(per_conversation), rtol=1e-6)


def test_jittable():
  w, logprobs_fn, teacher_bt = _problem()
  sampling_bt = logprobs_fn(w)
  adv_fn = jax.jit(losses.advantages, static_argnums=(3, 4))
  adv_bt = adv_fn(sampling_bt, teacher_bt, MASK_BT, 1.0, 0.9)
  # A traced discount factor takes the scan path too.
  adv2_bt = jax.jit(losses.advantages)(sampling_bt, teacher_bt, MASK_BT, 1.0, 0.9)
  np.testing.assert_allclose(np.asarray(adv_bt), np.asarray(adv2_bt), rtol=1e-6)
  loss_fn = jax.jit(losses.importance_sampling_loss, static_argnums=(4, 5))
  loss, _ = loss_fn(sampling_bt, sampling_bt, adv_bt, MASK_BT, 10.0, "token_mean")
  assert np.isfinite(float(loss))
