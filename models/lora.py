"""LoRA adapters for Qwen3: config, init, logical axes, merge into base weights, and the PEFT tensor layout.
`models/qwen3.py` applies them inside its forward (`x @ W + (x @ A) @ B * scale`); this module only builds them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models import qwen3

F32 = jnp.float32
LAYER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ALL_TARGETS = LAYER_TARGETS + ("lm_head",)
RANK_AXIS = "lora_rank"
PEFT_PREFIX = "base_model.model."
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`rank=0` is full fine-tuning: no adapters, every base weight trains. 'lm_head' may be given in `targets`
  (as the `lora_targets` config field does) and is then moved to `lm_head=True`."""
  rank: int
  alpha: float = 32.0
  targets: tuple[str, ...] = LAYER_TARGETS
  lm_head: bool = False

  def __post_init__(self):
    if isinstance(self.targets, str):  # '--config.lora_targets=q,v' arrives as one string
      object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
    targets = tuple(self.targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
      raise ValueError(f"LoraConfig.targets: unknown target {unknown[0]!r}; expected a subset of {ALL_TARGETS}")
    if "lm_head" in targets:
      object.__setattr__(self, "lm_head", True)
    object.__setattr__(self, "targets", tuple(t for t in LAYER_TARGETS if t in targets))
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 0:
      raise ValueError(f"LoraConfig.rank={self.rank!r}; expected an int >= 0 (0 = full fine-tuning)")
    if self.rank and not (self.targets or self.lm_head):
      raise ValueError("LoraConfig.targets is empty and lm_head=False: the adapter would train nothing")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def to_meta(self) -> dict[str, Any]:
    """The run-config fields (`lora_rank`, `lora_alpha`, `lora_targets`) that `from_meta` reads back."""
    return {"lora_rank": int(self.rank), "lora_alpha": float(self.alpha),
            "lora_targets": list(self.targets) + (["lm_head"] if self.lm_head else [])}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> "LoraConfig":
    """From a run config / checkpoint meta dict; a missing `lora_rank` is refused rather than guessed."""
    if "lora_rank" not in meta:
      raise KeyError(f"checkpoint meta has no 'lora_rank' (keys: {sorted(meta)}); save it with "
                     "LoraConfig.to_meta() in the run config")
    targets = meta.get("lora_targets", LAYER_TARGETS)
    if isinstance(targets, str):
      targets = [t.strip() for t in targets.split(",") if t.strip()]
    lm_head = bool(meta.get("lora_lm_head", False))
    return cls(rank=int(meta["lora_rank"]), alpha=float(meta.get("lora_alpha", 32.0)),
               targets=tuple(targets) + (("lm_head",) if lm_head else ()))


@dataclasses.dataclass(frozen=True)
class AdapterDecl:
  shape: tuple[int, ...]
  axes: tuple[str, ...]      # logical axes: A follows the weight's input axes, B its output axes
  fan_in: int                # input features of the projection (A's init bound is 1/sqrt(fan_in))


def _weight_decls(cfg: qwen3.Qwen3Config) -> dict[str, qwen3.ParamDecl]:
  """Target -> declaration of the weight it adapts. A tied model has no 'lm_head' weight; its adapter has the
  shape, axes and HF name an untied one would have."""
  decls = qwen3.param_decls(dataclasses.replace(cfg, tie_word_embeddings=False))
  out = {t: decls[f"layers/{t}"] for t in LAYER_TARGETS}
  out["lm_head"] = decls["lm_head"]
  return out


def adapter_decls(cfg: qwen3.Qwen3Config, lora_cfg: LoraConfig) -> dict[str, AdapterDecl]:
  """Flat 'layers/q/a' path -> shape and logical axes of every adapter leaf (stacked on the layer axis)."""
  if not lora_cfg.enabled:
    return {}
  r, out = lora_cfg.rank, {}
  weights = _weight_decls(cfg)
  names = [f"layers/{t}" for t in lora_cfg.targets] + (["lm_head"] if lora_cfg.lm_head else [])
  for path in names:
    decl = weights[path.split("/")[-1]]
    lead = 1 if path.startswith("layers/") else 0     # the stacked layer axis
    cut = lead + decl.in_dims
    in_shape, out_shape = decl.shape[lead:cut], decl.shape[cut:]
    in_axes, out_axes = decl.axes[lead:cut], decl.axes[cut:]
    fan_in = math.prod(in_shape)
    out[f"{path}/a"] = AdapterDecl(decl.shape[:lead] + in_shape + (r,), decl.axes[:lead] + in_axes + (RANK_AXIS,),
                                   fan_in)
    out[f"{path}/b"] = AdapterDecl(decl.shape[:lead] + (r,) + out_shape, decl.axes[:lead] + (RANK_AXIS,) + out_axes,
                                   fan_in)
  return out


def init_adapters(cfg: qwen3.Qwen3Config, lora_cfg: LoraConfig, key: jax.Array, dtype=F32):
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, so a fresh adapter
  changes no logit. None when `lora_cfg.rank == 0` (full fine-tuning)."""
  if not lora_cfg.enabled:
    return None
  return _init_adapters(cfg, lora_cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_adapters(cfg, lora_cfg, key, dtype):
  decls = adapter_decls(cfg, lora_cfg)
  # One draw for all A matrices: a random op per leaf costs a compile each on CPU (~0.5 s apiece).
  sizes = [math.prod(d.shape) for p, d in decls.items() if p.endswith("/a")]
  noise = jax.random.uniform(key, (sum(sizes),), F32, -1.0, 1.0)
  flat, offset = {}, 0
  for path, d in decls.items():
    if path.endswith("/b"):
      flat[path] = jnp.zeros(d.shape, dtype)
    else:
      n = math.prod(d.shape)
      flat[path] = (noise[offset:offset + n].reshape(d.shape) / math.sqrt(d.fan_in)).astype(dtype)
      offset += n
  return qwen3.unflatten(flat)


def _delta(a, b, weight_shape, lead: int):
  """A @ B reshaped to the weight's (per-head) shape, in fp32; `lead` leading axes (layers) are batched."""
  r = a.shape[-1]
  batch = a.shape[:lead]
  a2 = jnp.asarray(a, F32).reshape(batch + (-1, r))
  b2 = jnp.asarray(b, F32).reshape(batch + (r, -1))
  return jnp.matmul(a2, b2).reshape(weight_shape)


def merged_config(cfg: qwen3.Qwen3Config, adapters) -> qwen3.Qwen3Config:
  """The config of `merge()`'s output: untied when an lm_head adapter was folded into a tied model."""
  if adapters and "lm_head" in adapters and cfg.tie_word_embeddings:
    return dataclasses.replace(cfg, tie_word_embeddings=False)
  return cfg


def merge(cfg: qwen3.Qwen3Config, params, adapters, scale: float):
  """Params with W + A @ B * scale folded in (computed in fp32, cast to W's dtype).

  With tied embeddings, an lm_head adapter cannot be folded into the shared embedding without changing the input
  embeddings too, so the result is untied: it gains an 'lm_head' weight = embed.T + A B * scale, and
  `merged_config(cfg, adapters)` (tie_word_embeddings=False) is the config to save it with.
  """
  if not adapters:
    return params
  out = jax.tree.map(lambda x: x, params)   # new dicts, same leaves
  for name, ad in (adapters.get("layers") or {}).items():
    if name not in LAYER_TARGETS:
      raise ValueError(f"adapters['layers'][{name!r}]: not a LoRA target; expected one of {LAYER_TARGETS}")
    w = params["layers"][name]
    out["layers"][name] = (jnp.asarray(w, F32) + _delta(ad["a"], ad["b"], w.shape, 1) * scale).astype(w.dtype)
  if "lm_head" in adapters:
    ad = adapters["lm_head"]
    w = qwen3.lm_head(params)
    out["lm_head"] = (jnp.asarray(w, F32) + _delta(ad["a"], ad["b"], w.shape, 0) * scale).astype(w.dtype)
  return out


# --------------------------------------------------------------------------------------------------------------
# PEFT layout: per-layer `lora_A.weight` [r, in] and `lora_B.weight` [out, r] under HF module names.

def hf_module(cfg: qwen3.Qwen3Config, target: str) -> str:
  """'q' -> 'q_proj' (the name PEFT's target_modules uses)."""
  return _weight_decls(cfg)[target].hf_name.split(".")[-2]


def _peft_name(decl: qwen3.ParamDecl, layer: int | None, ab: str) -> str:
  module = decl.hf_name.format(i=layer).removesuffix(".weight")
  return f"{PEFT_PREFIX}{module}.lora_{ab}.weight"


def peft_tensors(cfg: qwen3.Qwen3Config, adapters) -> Iterator[tuple[str, np.ndarray]]:
  """(PEFT key, fp32 numpy array) for every adapter matrix, one layer at a time."""
  weights = _weight_decls(cfg)
  items = [(t, ad, True) for t, ad in (adapters.get("layers") or {}).items()]
  if "lm_head" in adapters:
    items.append(("lm_head", adapters["lm_head"], False))
  for target, ad, stacked in items:
    a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
    r = a.shape[-1]
    for i in range(a.shape[0]) if stacked else [None]:
      ai, bi = (a[i], b[i]) if stacked else (a, b)
      yield _peft_name(weights[target], i, "A"), np.ascontiguousarray(ai.reshape(-1, r).T)
      yield _peft_name(weights[target], i, "B"), np.ascontiguousarray(bi.reshape(r, -1).T)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def adapters_from_peft(cfg: qwen3.Qwen3Config, tensors: Mapping[str, np.ndarray], rank: int,
                       where: str = "adapter_model.safetensors"):
  """Inverse of `peft_tensors`: PEFT key -> array dict to the stacked adapter pytree (fp32) and its targets.

  Every targeted module must be present in every layer (jopd stacks adapters per layer); anything else is
  refused with the offending key named.
  """
  weights = _weight_decls(cfg)
  by_name = {}
  for target, decl in weights.items():
    layers = range(cfg.num_layers) if target != "lm_head" else [None]
    for i in layers:
      for ab in "AB":
        by_name[_peft_name(decl, i, ab).removeprefix(PEFT_PREFIX)] = (target, i, ab)
  found: dict[str, dict] = {}
  for key, t in tensors.items():
    m = _PEFT_KEY.match(key)
    if m is None:
      if ".base_layer." in key:  # PEFT saves the full lm_head/embedding next to their adapters; not an adapter
        log.warning("%s: ignoring %s (a base weight saved by PEFT; jopd takes base weights from the model)",
                        where, key)
        continue
      raise ValueError(f"{where}: tensor {key!r} is not a LoRA A/B matrix; only LoRA adapters of "
                       f"{[hf_module(cfg, t) for t in ALL_TARGETS]} can be imported")
    name = f"{m['module']}.lora_{m['ab']}.weight"
    if name not in by_name:
      raise ValueError(f"{where}: tensor {key!r} targets a module jopd cannot adapt; expected one of "
                       f"{[hf_module(cfg, t) for t in ALL_TARGETS]} in layers 0..{cfg.num_layers - 1}")
    target, i, ab = by_name[name]
    found.setdefault(target, {}).setdefault(ab, {})[i] = np.asarray(t, np.float32)

  adapters: dict[str, Any] = {}
  for target, mats in found.items():
    decl = weights[target]
    lead = 0 if target == "lm_head" else 1
    cut = lead + decl.in_dims
    in_shape, out_shape = decl.shape[lead:cut], decl.shape[cut:]
    want = {"A": (rank, math.prod(in_shape)), "B": (math.prod(out_shape), rank)}   # PEFT [r, in], [out, r]
    shapes = {"A": in_shape + (rank,), "B": (rank,) + out_shape}                     # jopd, per layer
    per_ab = {}
    for ab in "AB":
      got = mats.get(ab, {})
      layers = list(range(cfg.num_layers)) if lead else [None]
      missing = [i for i in layers if i not in got]
      if missing:
        raise ValueError(f"{where}: {_peft_name(decl, missing[0], ab)} is missing; jopd needs the "
                         f"{hf_module(cfg, target)} adapter in every layer (layers_to_transform is unsupported)")
      for i in layers:
        if got[i].shape != want[ab]:
          raise ValueError(f"{where}: {_peft_name(decl, i, ab)} has shape {got[i].shape}, expected {want[ab]} "
                           f"(r={rank} from adapter_config.json)")
      per_layer = [got[i].T.reshape(shapes[ab]) for i in layers]
      per_ab[ab.lower()] = jnp.asarray(np.stack(per_layer) if lead else per_layer[0])
    (adapters.setdefault("layers", {}) if lead else adapters)[target] = per_ab
  targets = tuple(t for t in ALL_TARGETS if t in found)
  return adapters, targets

