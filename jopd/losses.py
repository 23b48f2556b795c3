"""Losses of the trainer: reverse-KL advantages with discounting, the importance-sampling OPD loss, and SFT
cross-entropy. Pure, jittable jnp functions over [batch, time] arrays; masks select completion tokens.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

F32 = jnp.float32
LossNormalization = Literal["sum", "token_mean"]
CrossEntropyReduction = Literal["sum", "mean"]


def _mask(mask_bt: jax.Array) -> jax.Array:
  return mask_bt.astype(bool)


def reverse_kl_bt(sampling_logprobs_bt: jax.Array, teacher_logprobs_bt: jax.Array,
                  completion_mask_bt: jax.Array) -> jax.Array:
  """One-sample reverse-KL estimate per token, `r_t = ls_t - lt_t`, and 0 outside the completion.

  `jnp.where` (not a product) so that -inf or NaN logprobs at padding positions cannot reach the sum.
  """
  r_bt = sampling_logprobs_bt.astype(F32) - teacher_logprobs_bt.astype(F32)
  return jnp.where(_mask(completion_mask_bt), r_bt, 0.0)


def discounted_future_sum_bt(values_bt: jax.Array, mask_bt: jax.Array, discount: float | jax.Array) -> jax.Array:
  """`out_t = m_t * sum_{k>=t, m_k} discount^(n(t,k)) v_k` with n(t,k) the number of masked positions in (t, k].

  Only masked (completion) positions take part: values at unmasked positions are ignored, an unmasked position
  between two completion segments does not count as a discount step, and every unmasked position gets 0 — so
  advantage never leaks into prompt or padding. The recurrence `h_t = b_t + c_t h_{t+1}` (b = m v, c = discount
  at masked and 1 at unmasked positions) runs as a reverse associative scan, parallel over time.
  """
  m_bt = _mask(mask_bt)
  b_bt = jnp.where(m_bt, values_bt.astype(F32), 0.0)
  c_bt = jnp.where(m_bt, jnp.asarray(discount, F32), 1.0)

  def compose(later, earlier):
    # With reverse=True `later` holds the suffix to the right; apply it first, then `earlier`.
    c_later, b_later = later
    c_earlier, b_earlier = earlier
    return c_earlier * c_later, b_earlier + c_earlier * b_later

  _, h_bt = jax.lax.associative_scan(compose, (c_bt, b_bt), reverse=True, axis=1)
  return jnp.where(m_bt, h_bt, 0.0)


def advantages(sampling_logprobs_bt: jax.Array, teacher_logprobs_bt: jax.Array, completion_mask_bt: jax.Array,
               kl_penalty_coef: float | jax.Array, kl_discount_factor: float | jax.Array = 0.0) -> jax.Array:
  """Per-token OPD advantages `A_t` (float32, 0 outside the completion).

  `a_t = -kl_penalty_coef * (ls_t - lt_t)`; with `kl_discount_factor = g > 0`, `A_t = sum_{k>=t} g^(k-t) a_k`
  over completion tokens only (see `discounted_future_sum_bt`). The result is meant to be a constant: the loss
  stops its gradient.
  """
  a_bt = -jnp.asarray(kl_penalty_coef, F32) * reverse_kl_bt(sampling_logprobs_bt, teacher_logprobs_bt,
                                                             completion_mask_bt)
  if isinstance(kl_discount_factor, (int, float)):
    if not 0.0 <= kl_discount_factor <= 1.0:
      raise ValueError(f"jopd/losses.py advantages: kl_discount_factor={kl_discount_factor}; expected a number in "
                       "[0, 1] (0 = no discounting, the reference default)")
    if kl_discount_factor == 0.0:
      return a_bt  # already 0 outside the completion
  return discounted_future_sum_bt(a_bt, completion_mask_bt, kl_discount_factor)


def importance_sampling_loss(
    logprobs_bt: jax.Array, sampling_logprobs_bt: jax.Array, advantages_bt: jax.Array, mask_bt: jax.Array,
    ratio_log_cap: float | None, loss_normalization: LossNormalization = "sum",
    token_count: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`L = -sum_t m_t exp(clip(l_t - ls_t, -cap, cap)) sg(A_t) / Z`, and its metrics.

  logprobs_bt: the trainer's logprobs `l_t` of the sampled tokens (differentiable).
  sampling_logprobs_bt: `ls_t` from the sampler (treated as constants).
  ratio_log_cap: bound on |l_t - ls_t| so a stale ratio cannot explode; tokens at the bound get no gradient.
    None disables the cap.
  loss_normalization: 'sum' (Z = 1, the reference default) or 'token_mean' (Z = number of masked tokens).
  token_count: Z for 'token_mean' when the batch is split into micro-batches whose gradients are summed: pass
    the token count of the whole batch so the accumulated gradient equals the one of the unsplit batch.

  At `l == ls` the loss equals `-sum m A` (the kl_penalty_coef-scaled summed reverse KL when undiscounted) and
  its gradient is `-sum m A grad l`. Metrics (float32 scalars, no gradient): `sampler_trainer_kl` (mean of
  `ls - l`, the k1 estimate of KL(sampler || trainer); nonzero means the sampler and trainer disagree),
  `ratio/mean`, `ratio/clipped_frac`, `tokens`.
  """
  if loss_normalization not in ("sum", "token_mean"):
    raise ValueError(f"jopd/losses.py importance_sampling_loss: loss_normalization={loss_normalization!r}; "
                     "expected 'sum' or 'token_mean'")
  m_bt = _mask(mask_bt)
  num_tokens = jnp.sum(m_bt).astype(F32)
  log_ratio_bt = jnp.where(m_bt, logprobs_bt.astype(F32) - jax.lax.stop_gradient(sampling_logprobs_bt.astype(F32)),
                           0.0)
  if ratio_log_cap is None:
    capped_bt, clipped_bt = log_ratio_bt, jnp.zeros_like(m_bt)
  else:
    capped_bt = jnp.clip(log_ratio_bt, -ratio_log_cap, ratio_log_cap)
    clipped_bt = m_bt & (jnp.abs(log_ratio_bt) > ratio_log_cap)
  ratio_bt = jnp.exp(capped_bt)
  a_bt = jax.lax.stop_gradient(jnp.where(m_bt, advantages_bt.astype(F32), 0.0))
  total = -jnp.sum(jnp.where(m_bt, ratio_bt * a_bt, 0.0))
  if loss_normalization == "token_mean":
    z = num_tokens if token_count is None else jnp.asarray(token_count, F32)
    total = total / jnp.maximum(z, 1.0)
  safe_n = jnp.maximum(num_tokens, 1.0)
  metrics = jax.lax.stop_gradient({
      "sampler_trainer_kl": -jnp.sum(log_ratio_bt) / safe_n,
      "ratio/mean": jnp.sum(jnp.where(m_bt, ratio_bt, 0.0)) / safe_n,
      "ratio/clipped_frac": jnp.sum(clipped_bt).astype(F32) / safe_n,
      "tokens": num_tokens,
  })
  return total, metrics


def cross_entropy_loss(logprobs_bt: jax.Array, weights_bt: jax.Array, reduction: CrossEntropyReduction = "sum",
                       num_examples: jax.Array | float | None = None, segment_ids_bt: jax.Array | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted negative log-likelihood of target tokens for SFT, and its metrics.

  logprobs_bt: logprobs of each target token; weights_bt: its weight (1 on assistant content and
  `<|im_end|>`, 0 on prompts, headers and padding).
  reduction='sum': `sum_{b,t} w_bt * -l_bt` (the reference default; scale with batch size and length).
  reduction='mean': per example the weighted mean NLL `sum_t w -l / sum_t w`, then the mean over examples with
    positive total weight (examples with no weighted token count for nothing). An example is a row, or with
    `segment_ids_bt` (packed rows: ids 1, 2, ... per conversation, 0 on padding) one segment of a row.
    `num_examples` overrides the divisor, for micro-batches whose losses are summed into one batch.
  Metrics: `nll` (weighted mean NLL per token over the batch), `nll_x_tokens` (its numerator, which
  micro-batches add up) and `tokens` (sum of weights).
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"jopd/losses.py cross_entropy_loss: reduction={reduction!r}; expected 'sum' or 'mean'")
  w_bt = weights_bt.astype(F32)
  nll_bt = jnp.where(w_bt != 0, -logprobs_bt.astype(F32), 0.0)
  weighted_nll_bt = w_bt * nll_bt
  total_nll = jnp.sum(weighted_nll_bt)
  total_weight = jnp.sum(w_bt)
  if reduction == "sum":
    loss = total_nll
  else:
    if segment_ids_bt is None:
      segment_ids_bt, num_segments = jnp.zeros(w_bt.shape, jnp.int32), 1
    else:
      num_segments = w_bt.shape[1] + 1  # a row of T tokens holds at most T segments, ids 1..T
    per_segment = jax.vmap(lambda v_t, s_t: jax.ops.segment_sum(v_t, s_t, num_segments=num_segments))
    weighted_bs = per_segment(weighted_nll_bt, segment_ids_bt)
    weight_bs = per_segment(w_bt, segment_ids_bt)
    per_example_bs = weighted_bs / jnp.where(weight_bs > 0, weight_bs, 1.0)
    n = jnp.sum(weight_bs > 0).astype(F32) if num_examples is None else jnp.asarray(num_examples, F32)
    loss = jnp.sum(per_example_bs) / jnp.maximum(n, 1.0)
  metrics = jax.lax.stop_gradient({"nll": total_nll / jnp.maximum(total_weight, 1e-9),
                                   "nll_x_tokens": total_nll, "tokens": total_weight})
  return loss, metrics
