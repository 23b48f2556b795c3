"""Logprobs of given tokens under a model (teacher scoring, and the trainer's student logprobs with gradients),
with the vocab projection and log-softmax done over chunks of positions so [B, T, V] fp32 never exists at once.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jopd import buckets, distributed, mesh as mesh_lib
from models import qwen3

F32 = jnp.float32
# Elements of one fp32 [B, C, V] logits chunk when chunk_size is not given (256 MiB).
CHUNK_ELEMENTS = 1 << 26


def auto_chunk_size(batch: int, vocab_size: int, length: int) -> int:
  """Positions per chunk so a fp32 [batch, chunk, vocab] block stays under CHUNK_ELEMENTS (a power of two)."""
  c = max(1, CHUNK_ELEMENTS // max(1, batch * vocab_size))
  return min(1 << (c.bit_length() - 1), 1 << max(0, (length - 1).bit_length()))


def tempered(logits, temperature):
  """logits / temperature; temperature <= 0 (greedy) means the unscaled logits, as the sampler records them."""
  t = jnp.asarray(temperature, F32)
  return logits / jnp.where(t > 0, t, 1.0)


def logits(params, h_btd, *, adapters=None, lora_scale=1.0):
  """`qwen3.logits_from_hidden` (fp32), but a tied head contracts the [V, D] embedding directly: through
  `embed.T`, XLA:CPU copied the whole transposed embedding on every call (every decoded token)."""
  if "lm_head" in params:
    return qwen3.logits_from_hidden(params, h_btd, adapters=adapters, lora_scale=lora_scale)
  out_btv = qwen3.einsum_f32("btd,vd->btv", h_btd, params["embed"])
  adapter = None if adapters is None else adapters.get("lm_head")
  if adapter is not None:
    low_btr = qwen3.einsum_f32("btd,dr->btr", h_btd, adapter["a"]).astype(h_btd.dtype)
    out_btv = out_btv + qwen3.einsum_f32("btr,rv->btv", low_btr, adapter["b"]) * lora_scale
  return out_btv


def _chunk_stats(head_dv, adapter, lora_scale, temperature, h_bcd, targets_bc):
  logits_bcv = tempered(qwen3.head_logits(h_bcd, head_dv, adapter, lora_scale), temperature)
  # logsumexp written out so its exp() serves the entropy too: one pass of exp over [B, C, V], not two.
  max_bc1 = jax.lax.stop_gradient(jnp.max(logits_bcv, axis=-1, keepdims=True))
  exp_bcv = jnp.exp(logits_bcv - max_bc1)
  sum_bc1 = jnp.sum(exp_bcv, axis=-1, keepdims=True)
  lse_bc = (max_bc1 + jnp.log(sum_bc1))[..., 0]
  target_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  # Entropy = lse - E_p[logit].
  entropy_bc = lse_bc - jnp.sum(exp_bcv * logits_bcv, axis=-1) / sum_bc1[..., 0]
  return target_bc - lse_bc, entropy_bc


def logprobs_from_hidden(params, h_btd, targets_bt, *, adapters=None, lora_scale=1.0, temperature=1.0,
                         chunk_size: int = 128):
  """(logprob of targets_bt [B, T], entropy [B, T]) in fp32 from hidden states [B, T, D], chunked over T.

  Each chunk is rematerialised in the backward pass, so gradients keep only [B, T, D] alive, not logits."""
  b, t, d = h_btd.shape
  c = max(1, min(chunk_size, t))
  n = -(-t // c)
  if n * c != t:
    h_btd = jnp.pad(h_btd, ((0, 0), (0, n * c - t), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, n * c - t)))
  h_nbcd = h_btd.reshape(b, n, c, d).swapaxes(0, 1)
  targets_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)
  # The [D, V] head is taken once per call (for a tied head, one transposed copy of the embedding), outside
  # the chunk loop, so the 2 x n_chunks matmuls over it read the layout they want.
  head_dv = qwen3.lm_head(params)
  adapter = None if adapters is None else adapters.get("lm_head")
  stats = jax.checkpoint(functools.partial(_chunk_stats, head_dv, adapter, lora_scale, temperature))
  logp_nbc, entropy_nbc = jax.lax.map(lambda xs: stats(*xs), (h_nbcd, targets_nbc))
  unchunk = lambda x_nbc: x_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
  return unchunk(logp_nbc), unchunk(entropy_nbc)


def sequence_logprobs(cfg: qwen3.Qwen3Config, params, tokens_bt, mask_bt, targets_bt, *, adapters=None,
                      lora_scale=1.0, temperature=1.0, chunk_size: int = 128, positions_bt=None,
                      segment_ids_bt=None, attention_blocks: int = qwen3.FORWARD_BLOCKS):
  """Pure, jittable, differentiable core: logprobs[b, t] = log p(targets_bt[b, t] | tokens_bt[b, :t+1]) at
  `temperature`, and the entropy of that distribution, both [B, T] fp32 and 0 where mask_bt is False.

  The trainer passes tokens = prompt + completion and targets = tokens shifted left by one, and
  attention_blocks=qwen3.TRAIN_BLOCKS (see there)."""
  h_btd = qwen3.hidden_states(cfg, params, tokens_bt, mask_bt, adapters=adapters, lora_scale=lora_scale,
                              positions_bt=positions_bt, segment_ids_bt=segment_ids_bt,
                              attention_blocks=attention_blocks)
  logp_bt, entropy_bt = logprobs_from_hidden(params, h_btd, targets_bt, adapters=adapters,
                                             lora_scale=lora_scale, temperature=temperature,
                                             chunk_size=chunk_size)
  mask_bt = mask_bt.astype(bool)
  return jnp.where(mask_bt, logp_bt, 0.0), jnp.where(mask_bt, entropy_bt, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk_size", "batch_sharding"))
def _score(cfg, params, adapters, lora_scale, temperature, tokens_bt, mask_bt, *, chunk_size, batch_sharding):
  if batch_sharding is not None:
    tokens_bt, mask_bt = (jax.lax.with_sharding_constraint(x, batch_sharding) for x in (tokens_bt, mask_bt))
  targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
  # Position t scores token t+1, so the last real position of each row has no target.
  target_mask_bt = mask_bt & jnp.pad(mask_bt[:, 1:], ((0, 0), (0, 1)))
  logp_bt, _ = sequence_logprobs(cfg, params, tokens_bt, mask_bt, targets_bt, adapters=adapters,
                                 lora_scale=lora_scale, temperature=temperature, chunk_size=chunk_size)
  return jnp.where(target_mask_bt, logp_bt, 0.0)


def compile_count() -> int:
  """Programs compiled so far by `token_logprobs` (one per bucket)."""
  return _score._cache_size()


def batch_sharding(mesh: Mesh | None) -> tuple[NamedSharding | None, int]:
  """Batch on ('data', 'fsdp') (axes the mesh lacks are left out), and how many batch shards that makes."""
  if mesh is None:
    return None, 1
  axes = tuple(a for a in mesh_lib.BATCH if a in mesh.shape)
  return NamedSharding(mesh, P(axes or None)), math.prod(mesh.shape[a] for a in axes)


def place(tree, mesh: Mesh | None):
  """Puts a params/adapters pytree on `mesh` by jopd.mesh's partition rules, unless it already lives there."""
  leaves = jax.tree.leaves(tree)
  if mesh is None or all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
                         for x in leaves):
    return tree
  if not isinstance(tree, dict):  # a bare array (the rng key): replicated
    return jax.device_put(tree, NamedSharding(mesh, P()))
  return jax.device_put(tree, mesh_lib.shardings_for(tree, mesh))


def token_logprobs(cfg: qwen3.Qwen3Config, params, contexts: Sequence[Sequence[int]],
                   continuations: Sequence[Sequence[int]], *, adapters=None, lora_scale: float = 1.0,
                   temperature: float = 1.0, chunk_size: int | None = None, batch_size: int | None = None,
                   mesh: Mesh | None = None) -> list[np.ndarray]:
  """Per row i, log p(continuations[i][j] | contexts[i] + continuations[i][:j]) as float32 [len(cont_i)].

  Rows are grouped (`batch_size` rows at a time, shortest first; all at once by default) and each group is padded
  to a (batch, length) bucket, so a run compiles one program per bucket. `temperature` divides the logits as
  the sampler does (<= 0: unscaled, the sampler's greedy convention). `chunk_size` positions per vocab block
  (default: a [B, C, V] fp32 block of at most 256 MiB)."""
  if len(contexts) != len(continuations):
    raise ValueError(f"token_logprobs: {len(contexts)} contexts but {len(continuations)} continuations; "
                     "expected one context per continuation")
  buckets.check_token_ids(contexts, cfg.vocab_size, "contexts")
  buckets.check_token_ids(continuations, cfg.vocab_size, "continuations")
  for i, ctx in enumerate(contexts):
    if len(ctx) == 0:
      raise ValueError(f"token_logprobs: contexts[{i}] is empty; the first continuation token needs at least "
                       "one context token (e.g. BOS) to condition on")
  sharding, shards = batch_sharding(mesh)
  params, adapters = place(params, mesh), place(adapters, mesh)
  rows = [list(c) + list(x) for c, x in zip(contexts, continuations)]
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  group = batch_size or max(1, len(rows))
  out: list[np.ndarray] = [np.zeros((0,), np.float32)] * len(rows)
  for start in range(0, len(order), group):
    ids = order[start:start + group]
    batch = buckets.batch_bucket(len(ids), shards)
    length = buckets.length_bucket(max(len(rows[i]) for i in ids))
    tokens_bt, mask_bt = buckets.pad_rows([rows[i] for i in ids], batch, length, left=False)
    chunk = chunk_size or auto_chunk_size(batch, cfg.vocab_size, length)
    logp_bt = distributed.fetch(_score(cfg, params, adapters, np.float32(lora_scale), np.float32(temperature),
                                       tokens_bt, mask_bt, chunk_size=chunk, batch_sharding=sharding))
    for row, i in enumerate(ids):
      n_ctx, n_cont = len(contexts[i]), len(continuations[i])
      out[i] = logp_bt[row, n_ctx - 1:n_ctx - 1 + n_cont].astype(np.float32)
  return out
