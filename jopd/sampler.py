"""Batched sampling from a Qwen3 model: one jitted prefill (which also samples the first token) and one jitted
decode loop (`lax.while_loop` over a donated KV cache, no host round trip per token), over bucketed shapes.

The logprob recorded for each token is that of the distribution it was sampled from: log_softmax of
logits / temperature after top-k and top-p truncation (the kept tokens renormalised). With temperature == 0 the
token is the argmax and its recorded logprob is log_softmax of the unscaled, untruncated logits (what
`scoring.token_logprobs(..., temperature=0)` or `temperature=1` returns). Top-p keeps the smallest prefix of the
sorted distribution whose mass reaches top_p (ties at the threshold are all kept).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jopd import buckets, distributed, scoring
from models import qwen3

F32 = jnp.float32


@dataclasses.dataclass
class SampleResult:
  """Per prompt: completion token ids (int32, the stop token included when it ended the row, never padding),
  their sampling logprobs (float32) and why the row ended ('stop' or 'length')."""
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  finish_reasons: list[str]


class SamplingParams(NamedTuple):
  """Traced, so changing them never recompiles."""
  temperature: jax.Array   # f32 []; 0 = greedy
  top_k: jax.Array         # i32 []; 0 = off
  top_p: jax.Array         # f32 []; 1 = off


class LoopState(NamedTuple):
  step: jax.Array          # i32 []: tokens emitted so far per live row (next column of the buffers)
  last_b: jax.Array        # i32 [B]: the token fed to the next decode step
  done_b: jax.Array        # bool [B]: row stopped, hit the limit, or is batch padding
  stopped_b: jax.Array     # bool [B]: row ended on a stop token
  length_b: jax.Array      # i32 [B]: completion length
  tokens_bn: jax.Array     # i32 [B, N]: completion buffer, 0 after the end
  logprobs_bn: jax.Array   # f32 [B, N]
  cache: dict
  rng: jax.Array


# --------------------------------------------------------------------------------------------------------------
# One sampling step on [B, V] logits.

def _order_key(x):
  """Monotone map of float32 to uint32 (x < y iff key(x) < key(y)), so thresholds can be bisected exactly."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.where(i < 0, ~i, i | jnp.int32(-2**31)), jnp.uint32)


def _largest_key(ok, keys_bv):
  """Per row, the largest uint32 t with ok(t) true, where ok is true at 0 and monotone (true then false)."""
  lo = jnp.zeros(keys_bv.shape[:1] + (1,), jnp.uint32)
  hi = jnp.full_like(lo, 0xFFFFFFFF)

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2 + 1
    good = (lo < hi) & ok(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

  return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _truncate(scaled_bv, top_k, top_p):
  """Sets logits outside the top-k set, then outside the top-p nucleus of the renormalised rest, to -inf.
  Thresholds are found by bisection on the float order (64 passes over [B, V]): no vocab sort, which is
  ~70x slower than one pass on CPU."""
  keys_bv = _order_key(scaled_bv)
  k = jnp.where(top_k > 0, top_k, scaled_bv.shape[-1])
  kth_b1 = _largest_key(lambda t: jnp.sum(keys_bv >= t, axis=-1, keepdims=True) >= k, keys_bv)
  in_k_bv = keys_bv >= kth_b1
  probs_bv = jax.nn.softmax(jnp.where(in_k_bv, scaled_bv, -jnp.inf), axis=-1)
  mass = lambda t: jnp.sum(jnp.where(keys_bv >= t, probs_bv, 0.0), axis=-1, keepdims=True)
  pth_b1 = _largest_key(lambda t: mass(t) >= top_p, keys_bv)
  return jnp.where(in_k_bv & (keys_bv >= pth_b1), scaled_bv, -jnp.inf)


_BLOCK = 256


def _inverse_cdf(rng, probs_bv):
  """A draw from unnormalised probs [B, V]: pick a block of _BLOCK tokens by its mass, then a token inside it,
  each with its own uniform. Two uniforms per row instead of V Gumbels (the RNG dominated a decode step on CPU),
  and the two-level sums keep fp32 rounding of the CDF small."""
  b, v = probs_bv.shape
  nb = -(-v // _BLOCK)
  blocks_bnk = jnp.pad(probs_bv, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  mass_bn = jnp.sum(blocks_bnk, axis=-1)
  u_b2 = jax.random.uniform(rng, (b, 2), F32)

  def pick(weights_bn, u_b):
    cum_bn = jnp.cumsum(weights_bn, axis=-1)
    i_b = jnp.sum(cum_bn <= u_b[:, None] * cum_bn[:, -1:], axis=-1)
    # Rounding can push the draw past the end; fall back to the last entry with mass.
    last_b = jnp.max(jnp.where(weights_bn > 0, jnp.arange(weights_bn.shape[-1]), 0), axis=-1)
    return jnp.minimum(i_b, last_b)

  block_b = pick(mass_bn, u_b2[:, 0])
  inner_bk = jnp.take_along_axis(blocks_bnk, block_b[:, None, None], axis=1)[:, 0]
  return (block_b * _BLOCK + pick(inner_bk, u_b2[:, 1])).astype(jnp.int32)


def sample_token(logits_bv, rng, sp: SamplingParams):
  """(token [B] int32, its sampling logprob [B] f32) from fp32 logits; see the module docstring."""
  greedy = sp.temperature <= 0
  scaled_bv = scoring.tempered(logits_bv, sp.temperature)
  truncated_bv = jax.lax.cond(~greedy & ((sp.top_k > 0) | (sp.top_p < 1.0)),
                              lambda x: _truncate(x, sp.top_k, sp.top_p), lambda x: x, scaled_bv)
  max_b1 = jnp.max(truncated_bv, axis=-1, keepdims=True)
  probs_bv = jnp.exp(truncated_bv - max_b1)
  v = logits_bv.shape[-1]
  # First index of the max (as argmax), but two vectorised reductions instead of argmax's slow variadic one.
  argmax = lambda: jnp.min(jnp.where(truncated_bv == max_b1, jnp.arange(v), v), axis=-1).astype(jnp.int32)
  token_b = jax.lax.cond(greedy, argmax, lambda: _inverse_cdf(rng, probs_bv))
  logp_b = (jnp.take_along_axis(truncated_bv, token_b[:, None], axis=-1) - max_b1
            - jnp.log(jnp.sum(probs_bv, axis=-1, keepdims=True)))[:, 0]
  return token_b, logp_b


def _emit(state: LoopState, logits_bv, stop_ids, max_new, sp) -> LoopState:
  """Samples one token per live row, writes it at column `step`, and marks rows that stop or hit the limit."""
  rng, key = jax.random.split(state.rng)
  token_b, logp_b = sample_token(logits_bv, key, sp)
  live_b = ~state.done_b
  token_b = jnp.where(live_b, token_b, 0)
  logp_b = jnp.where(live_b, logp_b, 0.0)
  col = (0, state.step)
  stop_b = live_b & jnp.any(token_b[:, None] == stop_ids[None, :], axis=-1)
  length_b = state.length_b + live_b.astype(jnp.int32)
  return state._replace(
      step=state.step + 1, last_b=token_b, rng=rng, length_b=length_b,
      done_b=state.done_b | stop_b | (length_b >= max_new), stopped_b=state.stopped_b | stop_b,
      tokens_bn=jax.lax.dynamic_update_slice(state.tokens_bn, token_b[:, None], col),
      logprobs_bn=jax.lax.dynamic_update_slice(state.logprobs_bn, logp_b[:, None], col))


# --------------------------------------------------------------------------------------------------------------
# The two programs.

def _constrain(x, sharding):
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _cache_shardings(cfg, mesh, unrolled: bool):
  """K/V [L, B, S, KV, Dh] (or L arrays [B, KV, S, Dh] when unrolled): batch on ('data','fsdp'), KV heads on
  'tensor' when it divides them."""
  if mesh is None:
    return None
  batch = scoring.batch_sharding(mesh)[0].spec[0]
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and cfg.num_kv_heads % tensor == 0 else None
  rows = NamedSharding(mesh, P(batch))
  if unrolled:
    kv = (NamedSharding(mesh, P(batch, heads, None, None)),) * cfg.num_layers
  else:
    kv = NamedSharding(mesh, P(None, batch, None, heads, None))
  return {"k": kv, "v": kv, "valid": rows, "index": NamedSharding(mesh, P()), "position": rows}


def _unstack(tree, n: int) -> list:
  """Per-layer slices of stacked [L, ...] leaves. Taken once per program run, outside the token loop: XLA:CPU
  copies a weight slice that feeds a dot, so slicing inside the loop re-copies every weight every token."""
  if tree is None:
    return [None] * n
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _attend_one(q_b1hd, k_bksd, v_bksd, valid_bs):
  """`qwen3.attention` for one query per row over a [B, KV, S, Dh] cache: query heads grouped per KV head (K/V
  never repeated), and a layout both dots read in place (the [B, S, KV, Dh] layout made XLA:CPU transpose the
  whole cache every token). Softmax in fp32."""
  b, _, h, dh = q_b1hd.shape
  kv = k_bksd.shape[1]
  q_bkgd = q_b1hd.reshape(b, kv, h // kv, dh)
  scores_bkgs = qwen3.einsum_f32("bkgd,bksd->bkgs", q_bkgd, k_bksd) * dh**-0.5
  scores_bkgs = jnp.where(valid_bs[:, None, None, :], scores_bkgs, jnp.finfo(F32).min)
  probs_bkgs = jax.nn.softmax(scores_bkgs, axis=-1).astype(v_bksd.dtype)
  out_bkgd = qwen3.einsum_f32("bkgs,bksd->bkgd", probs_bkgs, v_bksd)
  return out_bkgd.astype(q_b1hd.dtype).reshape(b, 1, h, dh)


def _decode_step_unrolled(cfg, params, layers, layer_adapters, adapters, lora_scale, tokens_b, cache):
  """`qwen3.decode_step` with a Python loop over per-layer weights and per-layer [B, KV, S, Dh] K/V buffers
  (the CPU path)."""
  index, positions_bt = cache["index"], cache["position"][:, None]
  valid_bs = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((tokens_b.shape[0], 1), bool), (0, index))
  x = params["embed"][tokens_b[:, None]]
  ks, vs = [], []
  for lp, la, k_bksd, v_bksd in zip(layers, layer_adapters, cache["k"], cache["v"]):
    q, k, v = qwen3._qkv(cfg, x, positions_bt, lp, la, lora_scale)
    k_bksd = jax.lax.dynamic_update_slice(k_bksd, k.swapaxes(1, 2).astype(k_bksd.dtype), (0, 0, index, 0))
    v_bksd = jax.lax.dynamic_update_slice(v_bksd, v.swapaxes(1, 2).astype(v_bksd.dtype), (0, 0, index, 0))
    att = _attend_one(q, k_bksd.astype(q.dtype), v_bksd.astype(q.dtype), valid_bs)
    x = qwen3._mlp(cfg, x + qwen3.project("o", att, lp, la, lora_scale), lp, la, lora_scale)
    ks.append(k_bksd)
    vs.append(v_bksd)
  h = qwen3.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  logits_bv = scoring.logits(params, h, adapters=adapters, lora_scale=lora_scale)[:, 0]
  return logits_bv, {"k": tuple(ks), "v": tuple(vs), "valid": valid_bs, "index": index + 1,
                     "position": cache["position"] + 1}


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "max_len", "mesh", "unrolled"))
def _prefill(cfg, params, adapters, lora_scale, tokens_bt, mask_bt, live_b, rng, sp, stop_ids, max_new, *,
             cache_len, max_len, mesh, unrolled):
  rows_sh = None if mesh is None else _cache_shardings(cfg, mesh, False)["valid"]
  tokens_bt, mask_bt = _constrain(tokens_bt, rows_sh), _constrain(mask_bt, rows_sh)
  b = tokens_bt.shape[0]
  cache = qwen3.init_cache(cfg, b, cache_len, dtype=params["embed"].dtype)
  if mesh is not None:
    cache = jax.tree.map(_constrain, cache, _cache_shardings(cfg, mesh, False))
  logits_bv, cache = qwen3.prefill(cfg, params, tokens_bt, mask_bt, cache, adapters=adapters,
                                   lora_scale=lora_scale, unrolled=unrolled)
  if unrolled:  # one copy into per-layer [B, KV, S, Dh] buffers, which decode updates and reads in place
    per_layer = lambda kv: tuple(x.swapaxes(1, 2) for x in _unstack(kv, cfg.num_layers))
    cache = dict(cache, k=per_layer(cache["k"]), v=per_layer(cache["v"]))
    if mesh is not None:
      cache = jax.tree.map(_constrain, cache, _cache_shardings(cfg, mesh, True))
  state = LoopState(
      step=jnp.zeros((), jnp.int32), last_b=jnp.zeros((b,), jnp.int32), done_b=~live_b,
      stopped_b=jnp.zeros((b,), bool), length_b=jnp.zeros((b,), jnp.int32),
      tokens_bn=jnp.zeros((b, max_len), jnp.int32), logprobs_bn=jnp.zeros((b, max_len), F32),
      cache=cache, rng=rng)
  return _emit(state, logits_bv, stop_ids, max_new, sp)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "unrolled"), donate_argnames=("state",))
def _decode(cfg, params, adapters, lora_scale, state: LoopState, sp, stop_ids, max_new, *, mesh, unrolled):
  # The token loop keeps bf16 dots (`qwen3.native_dots`): upcast, each token would convert every weight, and
  # fp32 copies hoisted out of the loop ran 14% faster at batch 1 but 20% slower at 16 (AVX2 Zen 3).
  with qwen3.native_dots():
    return _decode_loop(cfg, params, adapters, lora_scale, state, sp, stop_ids, max_new, mesh=mesh,
                        unrolled=unrolled)


def _decode_loop(cfg, params, adapters, lora_scale, state: LoopState, sp, stop_ids, max_new, *, mesh, unrolled):
  cache_sh = _cache_shardings(cfg, mesh, unrolled)
  if unrolled:
    layers = _unstack(params["layers"], cfg.num_layers)
    layer_adapters = _unstack(None if adapters is None else adapters.get("layers"), cfg.num_layers)
    step = functools.partial(_decode_step_unrolled, cfg, params, layers, layer_adapters, adapters, lora_scale)
  else:
    step = functools.partial(qwen3.decode_step, cfg, params, adapters=adapters, lora_scale=lora_scale)

  def cond(s: LoopState):
    return (s.step < max_new) & ~jnp.all(s.done_b)

  def body(s: LoopState):
    logits_bv, cache = step(s.last_b, s.cache)
    if cache_sh is not None:
      cache = jax.tree.map(_constrain, cache, cache_sh)
    return _emit(s._replace(cache=cache), logits_bv, stop_ids, max_new, sp)

  # The whole state is returned so the donated input buffers (the cache above all) alias the loop's own.
  return jax.lax.while_loop(cond, body, state)


def compile_count() -> int:
  """Programs compiled so far by `sample` (prefill + decode loop, one each per bucket)."""
  return _prefill._cache_size() + _decode._cache_size()


# --------------------------------------------------------------------------------------------------------------
# Host entry point.

def sample(cfg: qwen3.Qwen3Config, params, prompts: Sequence[Sequence[int]], *, adapters=None,
           lora_scale: float = 1.0, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, stop_token_ids: Sequence[int] = (), rng: jax.Array,
           mesh: Mesh | None = None, layer_loop: str = "auto") -> SampleResult:
  """Samples up to `max_new_tokens` tokens after each prompt (token-id lists of any lengths); a row ends at its
  first stop token (kept in the completion). Adapters are applied unmerged. With `mesh`, rows are sharded on
  ('data', 'fsdp') and the KV cache's heads on 'tensor'; params that do not already live on `mesh` are placed
  by jopd.mesh's partition rules.

  `layer_loop`: 'scan' runs `qwen3.decode_step` (a scan over stacked layers); 'unrolled' slices the layers once
  per call (a second copy of the layer weights while decoding) and loops over them in Python with per-layer
  [B, KV, S, Dh] K/V buffers, which XLA:CPU runs several times faster because it copies a scanned weight slice
  that feeds a dot every token; 'auto' picks 'unrolled' on CPU, else 'scan'."""
  return _sample(cfg, params, prompts, adapters=adapters, lora_scale=lora_scale, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, rng=rng,
                 mesh=mesh, layer_loop=layer_loop, live=True)


def warm_up(cfg: qwen3.Qwen3Config, params, *, rows: int, prompt_len: int, adapters=None,
            lora_scale: float = 1.0, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
            top_p: float = 1.0, stop_token_ids: Sequence[int] = (), rng: jax.Array, mesh: Mesh | None = None,
            layer_loop: str = "auto") -> None:
  """Compiles the prefill and decode programs that `sample` with these arguments would use for `rows` prompts
  of `prompt_len` tokens, and runs them once with every row already finished: one prefill over padding, no
  decode step, nothing returned. A run calls it for each prompt-length bucket it can reach, so that later
  steps never compile."""
  _sample(cfg, params, [[0] * prompt_len] * rows, adapters=adapters, lora_scale=lora_scale,
          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
          stop_token_ids=stop_token_ids, rng=rng, mesh=mesh, layer_loop=layer_loop, live=False)


def _sample(cfg, params, prompts, *, adapters, lora_scale, max_new_tokens, temperature, top_k, top_p,
            stop_token_ids, rng, mesh, layer_loop, live: bool) -> SampleResult | None:
  """`sample` (live=True) or `warm_up` (live=False: every row starts finished, nothing is returned)."""
  if not prompts:
    raise ValueError("sample: prompts is empty; expected at least one token-id list")
  if max_new_tokens < 1:
    raise ValueError(f"sample: max_new_tokens={max_new_tokens}; expected >= 1")
  if top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError(f"sample: temperature={temperature}, top_k={top_k}, top_p={top_p}; expected "
                     "temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), 0 < top_p <= 1 (1 = off)")
  buckets.check_token_ids(prompts, cfg.vocab_size, "prompts")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"sample: prompts[{i}] is empty; expected at least one token (e.g. BOS)")
  stop = np.asarray(list(stop_token_ids), np.int32)
  buckets.check_token_ids([stop], cfg.vocab_size, "stop_token_ids")

  if layer_loop not in ("auto", "scan", "unrolled"):
    raise ValueError(f"sample: layer_loop={layer_loop!r}; expected 'auto', 'scan' or 'unrolled'")
  embed = params["embed"]
  if mesh is not None:
    platform = mesh.devices.flat[0].platform
  else:
    platform = next(iter(embed.devices())).platform if hasattr(embed, "devices") else jax.default_backend()
  unrolled = layer_loop == "unrolled" or (layer_loop == "auto" and platform == "cpu")
  # XLA:CPU runs a bf16 [1, D] x [D, F] dot as a naive matvec, ~8x slower than [2, D] x [D, F].
  min_rows = 2 if platform == "cpu" and embed.dtype == jnp.bfloat16 else 1
  shards = scoring.batch_sharding(mesh)[1]
  batch = buckets.batch_bucket(max(len(prompts), min_rows), shards)
  prompt_len = buckets.length_bucket(max(len(p) for p in prompts))
  max_len = buckets.length_bucket(max_new_tokens)
  tokens_bt, mask_bt = buckets.pad_rows(prompts, batch, prompt_len, left=True)
  live_b = (np.arange(batch) < len(prompts)) & live
  # Stop ids padded with -1 (never a token) to a fixed size, so their number does not change the program.
  stop_ids = np.full((buckets.length_bucket(len(stop), minimum=4),), -1, np.int32)
  stop_ids[:len(stop)] = stop
  sp = SamplingParams(np.float32(temperature), np.int32(top_k), np.float32(top_p))
  max_new = np.int32(max_new_tokens)
  params, adapters, rng = (scoring.place(x, mesh) for x in (params, adapters, rng))
  scale = np.float32(lora_scale)

  state = _prefill(cfg, params, adapters, scale, tokens_bt, mask_bt, live_b, rng, sp, stop_ids, max_new,
                   cache_len=prompt_len + max_len, max_len=max_len, mesh=mesh, unrolled=unrolled)
  final = _decode(cfg, params, adapters, scale, state, sp, stop_ids, max_new, mesh=mesh, unrolled=unrolled)
  if not live:
    jax.block_until_ready(final)
    return None
  # A collective in a multi-process run: every host gets the global results.
  tokens_bn, logprobs_bn, length_b, stopped_b = distributed.fetch(
      (final.tokens_bn, final.logprobs_bn, final.length_b, final.stopped_b))
  n = len(prompts)
  return SampleResult(
      tokens=[tokens_bn[i, :length_b[i]].astype(np.int32) for i in range(n)],
      logprobs=[logprobs_bn[i, :length_b[i]].astype(np.float32) for i in range(n)],
      finish_reasons=["stop" if stopped_b[i] else "length" for i in range(n)])
