"""Qwen3 as pure functions over a params pytree, numerically equal to transformers' Qwen3ForCausalLM.

Layer weights are stacked on a leading layer axis and run under `jax.lax.scan`; weights are stored `[in, out]`
with attention weights split per head. `PARAMS` declares every weight once (shape, logical axes, HF name) and
drives init, sharding rules and checkpoint conversion.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Params = dict[str, Any]
F32 = jnp.float32

# Fields of a transformers config.json that we read or that cannot change the math of inference.
_KNOWN_HF_FIELDS = frozenset("""
architectures model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
num_key_value_heads head_dim hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings rope_theta
rope_parameters rope_scaling attention_bias use_sliding_window sliding_window max_window_layers layer_types
attention_dropout initializer_range use_cache torch_dtype dtype transformers_version bos_token_id eos_token_id
pad_token_id _name_or_path output_attentions output_hidden_states return_dict id2label label2id
chunk_size_feed_forward is_encoder_decoder problem_type tokenizer_class partial_rotary_factor
""".split())


# transformers' Qwen3Config default when config.json has no head_dim (never hidden_size / num_attention_heads).
_HF_DEFAULT_HEAD_DIM = 128


class UnsupportedConfigError(ValueError):
  """A config.json asks for something this Qwen3 implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 40960
  # Not part of the HF config: the jax.checkpoint policy of the layer scan ('none', 'full', 'dots').
  remat: str = "none"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {sorted(_REMAT_POLICIES)}")

  @property
  def num_params(self) -> int:
    return sum(_size(d.shape) for d in param_decls(self).values())

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "Qwen3Config":
    """Reads a transformers `config.json` (a directory, the file, or its parsed dict)."""
    if isinstance(path_or_dict, Mapping):
      raw, where = dict(path_or_dict), "config"
    else:
      where = os.fspath(path_or_dict)
      if os.path.isdir(where):
        where = os.path.join(where, "config.json")
      if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no config.json (expected a transformers checkpoint directory)")
      with open(where) as f:
        try:
          raw = json.load(f)
        except json.JSONDecodeError as e:
          raise UnsupportedConfigError(
              f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
      if not isinstance(raw, dict):
        raise UnsupportedConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    return cls._from_dict(raw, where)

  @classmethod
  def _from_dict(cls, raw: dict[str, Any], where: str) -> "Qwen3Config":
    def refuse(field, why):
      raise UnsupportedConfigError(f"{where}: field {field!r}: {why}")

    model_type = raw.get("model_type")
    if model_type != "qwen3":
      hint = " (Qwen3-MoE is not implemented yet)" if model_type == "qwen3_moe" else ""
      refuse("model_type", f"got {model_type!r}, expected 'qwen3'{hint}")
    for moe_field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
      if raw.get(moe_field):
        refuse(moe_field, "mixture-of-experts configs are not supported")
    if raw.get("use_sliding_window"):
      refuse("use_sliding_window", "sliding-window attention is not implemented; set it to false")
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
      bad = next(t for t in layer_types if t != "full_attention")
      refuse("layer_types", f"only 'full_attention' layers are implemented, got {bad!r}")
    if raw.get("attention_bias"):
      refuse("attention_bias", "attention projections with bias are not implemented")
    if raw.get("hidden_act", "silu") != "silu":
      refuse("hidden_act", f"got {raw['hidden_act']!r}, only 'silu' is implemented")

    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for field, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
      rope_type = params.get("rope_type", params.get("type", "default"))
      if rope_type != "default":
        refuse(field, f"rope_type {rope_type!r} is not implemented (only 'default')")
    for field, params in (("partial_rotary_factor", raw), ("rope_parameters", rope)):
      if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse(field, f"partial_rotary_factor={params['partial_rotary_factor']} is not implemented (only 1.0: "
                      "RoPE over the whole head)")
    # transformers reads rope_parameters first (a top-level rope_theta only fills it when it is absent).
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
      refuse("rope_theta", "missing (neither rope_theta nor rope_parameters['rope_theta'] is set)")

    unknown = sorted(k for k in raw if k not in _KNOWN_HF_FIELDS)
    if unknown:
      logging.warning("%s: fields not read by jopd's Qwen3 (check they do not change the model): %s",
                      where, unknown)

    try:
      num_heads = int(raw["num_attention_heads"])
      hidden = int(raw["hidden_size"])
      return cls(
          vocab_size=int(raw["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(raw["intermediate_size"]),
          num_layers=int(raw["num_hidden_layers"]),
          num_heads=num_heads,
          num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
          head_dim=int(raw.get("head_dim") or _HF_DEFAULT_HEAD_DIM),
          rope_theta=float(theta),
          rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
          tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
          max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
      )
    except KeyError as e:
      refuse(e.args[0], "required field is missing")

  def to_hf(self) -> dict[str, Any]:
    """The transformers config.json dict for this config."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "hidden_act": "silu", "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
        "use_sliding_window": False, "attention_dropout": 0.0,
    }


# --------------------------------------------------------------------------------------------------------------
# One declaration per weight: shape, logical axes (mapped to mesh axes by jopd.mesh), HF tensor name, init.

class ParamDecl(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str, ...]      # logical axis names, one per dim
  hf_name: str               # '{i}' is the layer index for stacked weights
  init: str                  # 'normal' | 'ones'
  in_dims: int = 0           # leading (per-layer) dims that are the input of x @ W; 0: stored as in HF


def param_decls(cfg: Qwen3Config) -> dict[str, ParamDecl]:
  """Flat 'a/b' path -> declaration for every weight of the model."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p = "model.layers.{i}."
  decls = {
      "embed": ParamDecl((V, D), ("vocab", "embed"), "model.embed_tokens.weight", "normal"),
      "layers/attn_norm": ParamDecl((L, D), ("layers", "norm"), p + "input_layernorm.weight", "ones"),
      "layers/q": ParamDecl((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"),
                            p + "self_attn.q_proj.weight", "normal", 1),
      "layers/k": ParamDecl((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"),
                            p + "self_attn.k_proj.weight", "normal", 1),
      "layers/v": ParamDecl((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"),
                            p + "self_attn.v_proj.weight", "normal", 1),
      "layers/o": ParamDecl((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"),
                            p + "self_attn.o_proj.weight", "normal", 2),
      "layers/q_norm": ParamDecl((L, Dh), ("layers", "norm"), p + "self_attn.q_norm.weight", "ones"),
      "layers/k_norm": ParamDecl((L, Dh), ("layers", "norm"), p + "self_attn.k_norm.weight", "ones"),
      "layers/mlp_norm": ParamDecl((L, D), ("layers", "norm"), p + "post_attention_layernorm.weight", "ones"),
      "layers/gate": ParamDecl((L, D, F), ("layers", "embed", "mlp"), p + "mlp.gate_proj.weight", "normal", 1),
      "layers/up": ParamDecl((L, D, F), ("layers", "embed", "mlp"), p + "mlp.up_proj.weight", "normal", 1),
      "layers/down": ParamDecl((L, F, D), ("layers", "mlp", "embed"), p + "mlp.down_proj.weight", "normal", 1),
      "final_norm": ParamDecl((D,), ("norm",), "model.norm.weight", "ones"),
  }
  if not cfg.tie_word_embeddings:
    decls["lm_head"] = ParamDecl((D, V), ("embed", "vocab"), "lm_head.weight", "normal", 1)
  return decls


def unflatten(flat: Mapping[str, Any]) -> Params:
  """{'layers/q': x} -> {'layers': {'q': x}}."""
  tree: Params = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def init_params(cfg: Qwen3Config, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random params (normal(0, std) matrices, unit norms), layer weights stacked on axis 0."""
  decls = param_decls(cfg)
  keys = dict(zip(decls, jax.random.split(key, len(decls))))
  flat = {
      path: (jnp.ones(d.shape, dtype) if d.init == "ones"
             else (std * jax.random.normal(keys[path], d.shape, F32)).astype(dtype))
      for path, d in decls.items()
  }
  return unflatten(flat)


def _size(shape):
  n = 1
  for s in shape:
    n *= s
  return n


# --------------------------------------------------------------------------------------------------------------
# Building blocks.

def _cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16). Unknown: assume so."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return True
  flags = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      flags.update(value.split())
  return not flags or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def upcast_dots() -> bool:
  """Whether `_dot` multiplies bf16 operands as fp32: on a CPU without bf16 matmul instructions, where XLA:CPU's
  bf16 kernels emulate them (AVX2 Zen 3: bf16 GEMMs 53-93 GFLOP/s against 88-145 in fp32, bench model shapes).
  Exact either way: a bf16 x bf16 product fits in fp32 and both accumulate in fp32, so only the summation order
  can differ. `JOPD_BF16_DOTS=native|fp32` overrides the 'auto' choice (read once per process)."""
  mode = os.environ.get("JOPD_BF16_DOTS", "auto")
  if mode not in ("auto", "native", "fp32"):
    raise ValueError(f"JOPD_BF16_DOTS={mode!r}; expected 'auto', 'native' or 'fp32'")
  if mode != "auto":
    return mode == "fp32"
  return jax.default_backend() == "cpu" and not _cpu_has_bf16_matmul()


_native_dots = threading.local()


@contextlib.contextmanager
def native_dots():
  """Programs traced inside keep narrow dot operands whatever `upcast_dots()` says (the sampler's decode loop)."""
  before = getattr(_native_dots, "on", False)
  _native_dots.on = True
  try:
    yield
  finally:
    _native_dots.on = before


def wide(x):
  """x as a dot operand: fp32 when `upcast_dots()` and x is a narrower float (outside `native_dots`), else x."""
  narrow = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
  return x.astype(F32) if narrow and upcast_dots() and not getattr(_native_dots, "on", False) else x


def einsum_f32(eq: str, x, w):
  """einsum accumulating in fp32 (fp32 result) of `wide` operands; every jopd matmul goes through here."""
  return jnp.einsum(eq, wide(x), wide(w), preferred_element_type=F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _dot(eq: str, x, w, out_dtype=None):
  """einsum with fp32 accumulation, result in `out_dtype` (default x's dtype: bf16 on accelerators, and ~2.5x
  faster on CPU too).

  The backward runs in the operands' dtypes as well. Autodiff of the fp32-accumulating einsum + cast would upcast
  the cotangent and the weight to fp32 and run both gradient matmuls in fp32 (2-3x slower than bf16 on CPU).
  The cotangent is rounded to x's dtype first: exact when the output has x's dtype (the cotangent then carries no
  more bits), and the usual mixed-precision rounding when the output is wider (fp32 attention scores and logits
  of bf16 operands: FlashAttention rounds dS the same way, and a bf16 PyTorch model's logits are bf16 already).
  With fp32 operands nothing is rounded: the gradients equal autodiff's up to fp32 summation order."""
  return einsum_f32(eq, x, w).astype(out_dtype or x.dtype)


def _dot_fwd(eq, x, w, out_dtype):
  return _dot(eq, x, w, out_dtype), (x, w)


def _dot_bwd(eq, out_dtype, res, ct):
  x, w = res
  ins, out = eq.split("->")
  a, b = ins.split(",")
  ct = ct.astype(jnp.promote_types(x.dtype, w.dtype))  # fp32 when either operand is (LoRA factors)
  dx = einsum_f32(f"{out},{b}->{a}", ct, w).astype(x.dtype)
  dw = einsum_f32(f"{a},{out}->{b}", x, ct).astype(w.dtype)
  return dx, dw


_dot.defvjp(_dot_fwd, _dot_bwd)


def rms_norm(x, weight, eps):
  """transformers' Qwen3RMSNorm: normalise in fp32, cast back, then multiply by the weight."""
  x32 = x.astype(F32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope(x_bthd, positions_bt, theta: float):
  """Rotate-half RoPE, angles computed in fp32 then cast to x's dtype (as transformers does)."""
  dh = x_bthd.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=F32) / dh))
  angles_btf = positions_bt.astype(F32)[..., None] * inv_freq
  angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
  cos = jnp.cos(angles_btd).astype(x_bthd.dtype)[:, :, None, :]
  sin = jnp.sin(angles_btd).astype(x_bthd.dtype)[:, :, None, :]
  x1, x2 = jnp.split(x_bthd, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_bthd * cos + rotated * sin


# Added to masked attention scores: exp() of it is 0, and |scores| << 1e30 so the sum never overflows.
_MASKED = -1e30


def attention(q_bthd, k_bskd, v_bskd, mask_bts):
  """Grouped-query attention without repeating K/V: query heads are grouped per KV head. Softmax in fp32."""
  b, t, h, dh = q_bthd.shape
  kv = k_bskd.shape[2]
  # Queries as [B, KV, G, T, Dh], so the scores come out of the dot as [B, KV, G, T, S] (with [B, T, KV, G, Dh]
  # queries XLA:CPU transposed every scores tensor, in the forward and again in the backward).
  q_bkgtd = q_bthd.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)
  scores = _dot("bkgtd,bskd->bkgts", q_bkgtd, k_bskd, F32) * dh**-0.5
  # An additive mask: its backward passes the scores' cotangent through, where a select would be materialised
  # over [B, KV, G, T, S] in the forward, the rematerialised forward and the backward.
  scores = scores + jnp.where(mask_bts, 0.0, _MASKED)[:, None, None]
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
  out_bkgtd = _dot("bkgts,bskd->bkgtd", probs, v_bskd).astype(q_bthd.dtype)
  return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


# Query blocks of causal attention: a forward alone (scoring, prefill) runs fastest in 8 on CPU; a differentiated
# one in 2, because more blocks slowed the update's backward and its compile (12-layer bench model, 16 x 512,
# remat 'full': 1 / 2 / 4 / 8 blocks: step 8.4 / 7.4 / 7.2 / 8.9 s, compile 3.5 / 3.8 / 4.7 / 8.1 s).
FORWARD_BLOCKS = 8
TRAIN_BLOCKS = 2


def causal_block(t: int, blocks: int = FORWARD_BLOCKS) -> int:
  """Query block of `causal_attention` for a T-token sequence: T / blocks but at least 64 (0: one dense block)."""
  block = max(64, t // max(blocks, 1))
  return block if t % block == 0 and t >= 2 * block else 0


def causal_attention(q_bthd, k_bthd, v_bthd, mask_btt, blocks: int = FORWARD_BLOCKS):
  """`attention` of a sequence over itself whose mask is causal (query i never sees key j > i; padding and
  packing may mask more), computed per query block over the keys up to the block's end only: the blocks above
  the diagonal, which the mask zeroes, are never computed (at T = 512 in 8 blocks: 36 of 64 [64, 64] score
  blocks; the smaller working set runs faster besides: forward 3.6x on CPU). Equal to `attention` up to the
  order of the sums."""
  t = q_bthd.shape[1]
  block = causal_block(t, blocks)
  if not block:
    return attention(q_bthd, k_bthd, v_bthd, mask_btt)
  outs = []
  for start in range(0, t, block):
    end = start + block
    outs.append(attention(q_bthd[:, start:end], k_bthd[:, :end], v_bthd[:, :end], mask_btt[:, start:end, :end]))
  return jnp.concatenate(outs, axis=1)


def _project(x, w, adapter, scale, eq: str, eq_a: str, eq_b: str):
  """x @ W, plus the LoRA term (x @ A) @ B * scale when an adapter is given; W + AB is never formed."""
  y = _dot(eq, x, w)
  if adapter is not None:
    y = y + (_dot(eq_b, _dot(eq_a, x, adapter["a"]), adapter["b"]) * scale).astype(y.dtype)
  return y


_PROJ_EQS = {  # weight einsum, LoRA A einsum, LoRA B einsum
    "q": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "k": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "v": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "o": ("bthk,hkd->btd", "bthk,hkr->btr", "btr,rd->btd"),
    "gate": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "up": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "down": ("btf,fd->btd", "btf,fr->btr", "btr,rd->btd"),
    "lm_head": ("btd,dv->btv", "btd,dr->btr", "btr,rv->btv"),
}


def project(name, x, weights, adapters, scale):
  adapter = None if adapters is None else adapters.get(name)
  return _project(x, weights[name], adapter, scale, *_PROJ_EQS[name])


def _mlp(cfg, x, lp, la, scale):
  h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
  gate = project("gate", h, lp, la, scale)
  up = project("up", h, lp, la, scale)
  return x + project("down", jax.nn.silu(gate) * up, lp, la, scale)


def _qkv(cfg, x, positions_bt, lp, la, scale):
  h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
  q = rms_norm(project("q", h, lp, la, scale), lp["q_norm"], cfg.rms_norm_eps)
  k = rms_norm(project("k", h, lp, la, scale), lp["k_norm"], cfg.rms_norm_eps)
  v = project("v", h, lp, la, scale)
  return rope(q, positions_bt, cfg.rope_theta), rope(k, positions_bt, cfg.rope_theta), v


def _dots_saveable(prim, *avals, **params) -> bool:
  """`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, seeing through `_dot`'s custom VJP: the
  output of a matmul without batch dims is saved (projections, the head), attention's batched ones are not."""
  if prim.name == "custom_vjp_call":
    eqns = params["call_jaxpr"].jaxpr.eqns
    return any(jax.checkpoint_policies.dots_with_no_batch_dims_saveable(e.primitive, **e.params) for e in eqns)
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


_REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _dots_saveable,
}


def _scan_layers(cfg, body, carry, xs, unrolled: bool = False):
  """`lax.scan` of body over the stacked layers (remat per `cfg.remat`), or with `unrolled` (inference only) a
  Python loop over per-layer slices: XLA:CPU ran the scanned prefill's matmuls in fp32, converting every stacked
  weight on each call."""
  if unrolled:
    for i in range(cfg.num_layers):
      carry, _ = body(carry, jax.tree.map(lambda x: x[i], xs))
    return carry, None
  policy = _REMAT_POLICIES[cfg.remat]
  if cfg.remat != "none":
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  return jax.lax.scan(body, carry, xs)


def _layer_adapters(adapters):
  return None if adapters is None else adapters.get("layers")


def positions_from_mask(attention_mask_bt):
  """Positions count real tokens only (cumsum - 1), so left padding does not shift them."""
  return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


# --------------------------------------------------------------------------------------------------------------
# Full-sequence forward.

def hidden_states(cfg: Qwen3Config, params: Params, tokens_bt, attention_mask_bt=None, *, adapters=None,
                  lora_scale: float = 1.0, positions_bt=None, segment_ids_bt=None,
                  attention_blocks: int = FORWARD_BLOCKS):
  """Final-normed hidden states [B, T, D]. `segment_ids_bt` (packed rows) blocks attention across segments;
  `attention_blocks`: query blocks of `causal_attention` (TRAIN_BLOCKS under a gradient)."""
  b, t = tokens_bt.shape
  if attention_mask_bt is None:
    attention_mask_bt = jnp.ones((b, t), bool)
  attention_mask_bt = attention_mask_bt.astype(bool)
  if positions_bt is None:
    positions_bt = positions_from_mask(attention_mask_bt)
  causal_tt = jnp.tril(jnp.ones((t, t), bool))
  mask_bts = causal_tt[None] & attention_mask_bt[:, None, :]
  if segment_ids_bt is not None:
    mask_bts &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  # A fully masked query row (padding) attends to itself so its softmax stays finite.
  mask_bts |= jnp.eye(t, dtype=bool)[None]

  def body(x, layer):
    lp, la = layer
    q, k, v = _qkv(cfg, x, positions_bt, lp, la, lora_scale)
    x = x + project("o", causal_attention(q, k, v, mask_bts, attention_blocks), lp, la, lora_scale)
    return _mlp(cfg, x, lp, la, lora_scale), None

  x = params["embed"][tokens_bt]
  x, _ = _scan_layers(cfg, body, x, (params["layers"], _layer_adapters(adapters)))
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def lm_head(params: Params):
  """The [D, V] output projection (the transposed embedding when tied)."""
  return params["lm_head"] if "lm_head" in params else params["embed"].T


def logits_from_hidden(params, h_btd, *, adapters=None, lora_scale: float = 1.0):
  """Logits in fp32 (the matmul accumulates in fp32 whatever the weight dtype)."""
  return head_logits(h_btd, lm_head(params), None if adapters is None else adapters.get("lm_head"), lora_scale)


def head_logits(h_btd, w_dv, adapter=None, lora_scale: float = 1.0):
  """fp32 logits h @ W [D, V] (+ the LoRA term); see `_dot` for the backward's rounding."""
  logits = _dot("btd,dv->btv", h_btd, w_dv, F32)
  if adapter is not None:
    low = _dot("btd,dr->btr", h_btd, adapter["a"])
    logits = logits + _dot("btr,rv->btv", low, adapter["b"], F32) * lora_scale
  return logits


def forward(cfg: Qwen3Config, params: Params, tokens_bt, attention_mask_bt=None, *, adapters=None,
            lora_scale: float = 1.0, positions_bt=None, segment_ids_bt=None):
  """Logits [B, T, V] (fp32) of a full sequence. Left or right padding: positions come from the mask."""
  h = hidden_states(cfg, params, tokens_bt, attention_mask_bt, adapters=adapters, lora_scale=lora_scale,
                    positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)
  return logits_from_hidden(params, h, adapters=adapters, lora_scale=lora_scale)


# --------------------------------------------------------------------------------------------------------------
# KV cache: prefill a padded prompt batch, then decode one token per row per step.

def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
  """K/V [L, B, S, KV, Dh]; `valid` [B, S] marks filled slots; `index` is the next slot (shared by rows);
  `position` [B] is each row's next RoPE position."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
      "valid": jnp.zeros((batch, max_len), bool),
      "index": jnp.zeros((), jnp.int32), "position": jnp.zeros((batch,), jnp.int32),
  }


def prefill(cfg: Qwen3Config, params: Params, tokens_bt, attention_mask_bt, cache, *, adapters=None,
            lora_scale: float = 1.0, unrolled: bool = False):
  """Runs the prompt batch (any padding), writes its K/V to cache slots [0, T), and returns the fp32 logits of
  each row's last real token [B, V] and the cache. `unrolled`: loop over the layers in Python (see
  `_scan_layers`)."""
  b, t = tokens_bt.shape
  mask_bt = attention_mask_bt.astype(bool)
  positions_bt = positions_from_mask(mask_bt)
  mask_bts = (jnp.tril(jnp.ones((t, t), bool))[None] & mask_bt[:, None, :]) | jnp.eye(t, dtype=bool)[None]

  def body(carry, layer):
    x, k_cache, v_cache = carry
    lp, la, i = layer
    q, k, v = _qkv(cfg, x, positions_bt, lp, la, lora_scale)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (i, 0, 0, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (i, 0, 0, 0, 0))
    x = x + project("o", causal_attention(q, k, v, mask_bts), lp, la, lora_scale)
    return (_mlp(cfg, x, lp, la, lora_scale), k_cache, v_cache), None

  x = params["embed"][tokens_bt]
  layer_ids = jnp.arange(cfg.num_layers)
  (x, k_cache, v_cache), _ = _scan_layers(
      cfg, body, (x, cache["k"], cache["v"]), (params["layers"], _layer_adapters(adapters), layer_ids), unrolled)
  last_b = jnp.max(jnp.where(mask_bt, jnp.arange(t), 0), axis=-1)
  h_bd = rms_norm(x[jnp.arange(b), last_b], params["final_norm"], cfg.rms_norm_eps)
  logits = logits_from_hidden(params, h_bd[:, None], adapters=adapters, lora_scale=lora_scale)[:, 0]
  cache = {
      "k": k_cache, "v": v_cache,
      "valid": jax.lax.dynamic_update_slice(cache["valid"], mask_bt, (0, 0)),
      "index": jnp.asarray(t, jnp.int32),
      "position": jnp.sum(mask_bt, axis=-1).astype(jnp.int32),
  }
  return logits, cache


def decode_step(cfg: Qwen3Config, params: Params, tokens_b, cache, *, adapters=None, lora_scale: float = 1.0):
  """Feeds one token per row at cache slot `index`; returns fp32 logits [B, V] for the next token and the cache."""
  index = cache["index"]
  positions_bt = cache["position"][:, None]
  valid_bs = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((tokens_b.shape[0], 1), bool), (0, index))
  mask_b1s = valid_bs[:, None, :]

  def body(carry, layer):
    x, k_cache, v_cache = carry
    lp, la, i = layer
    q, k, v = _qkv(cfg, x, positions_bt, lp, la, lora_scale)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (i, 0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (i, 0, index, 0, 0))
    att = attention(q, k_cache[i].astype(q.dtype), v_cache[i].astype(q.dtype), mask_b1s)
    x = x + project("o", att, lp, la, lora_scale)
    return (_mlp(cfg, x, lp, la, lora_scale), k_cache, v_cache), None

  x = params["embed"][tokens_b[:, None]]
  layer_ids = jnp.arange(cfg.num_layers)
  (x, k_cache, v_cache), _ = _scan_layers(
      cfg, body, (x, cache["k"], cache["v"]), (params["layers"], _layer_adapters(adapters), layer_ids))
  h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  logits = logits_from_hidden(params, h, adapters=adapters, lora_scale=lora_scale)[:, 0]
  cache = {"k": k_cache, "v": v_cache, "valid": valid_bs, "index": index + 1,
           "position": cache["position"] + 1}
  return logits, cache
