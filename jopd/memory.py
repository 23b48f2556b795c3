"""Memory model: bytes per device of weights, adapters, optimizer state, KV cache and activations of the sample,
score and train-step programs, from a config, sizes and a mesh shape (no devices needed). docs/memory.md.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jopd import mesh as mesh_lib
from models import lora, qwen3


class SampleShape(NamedTuple):
  batch: int          # rows (bucketed, global)
  prompt_len: int     # prompt bucket
  max_new: int        # completion bucket


class ScoreShape(NamedTuple):
  batch: int
  length: int
  chunk: int          # positions per vocab chunk


class TrainShape(NamedTuple):
  batch: int
  length: int
  num_micro: int = 1
  logits_chunk: int = 128


def measured(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled program (per device): arguments, outputs, aliased (outputs written into
  donated arguments), temp, and peak = arguments + outputs - aliased + temp."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out


# --------------------------------------------------------------------------------------------------------------
# Per-device bytes of the trees a run holds, sharded by jopd.mesh's partition rules.

class _MeshShape:
  """What jopd.mesh.spec_for reads of a mesh (its axis sizes), so a plan needs no devices."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = {a: int(sizes.get(a, 1)) for a in mesh_lib.AXES}


def mesh_shape(mesh) -> dict[str, int]:
  """{'data': d, 'fsdp': f, 'tensor': t} from a jax Mesh, a dict, or None (one device)."""
  if mesh is None:
    return {a: 1 for a in mesh_lib.AXES}
  sizes = dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)
  return {a: int(sizes.get(a, 1)) for a in mesh_lib.AXES}


def tree_bytes(tree, mesh=None) -> int:
  """Bytes per device of a tree of arrays or ShapeDtypeStructs placed by the partition rules (a mesh axis that
  does not divide a dim is dropped there, as jopd.mesh does)."""
  fake = _MeshShape(mesh_shape(mesh))
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = mesh_lib.spec_for(mesh_lib.path_str(path), leaf.shape, fake)
    n = 1
    for dim, entry in zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape)):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
      n *= dim // math.prod(fake.shape[a] for a in axes)
    total += n * jnp.dtype(leaf.dtype).itemsize
  return total


def _batch_shards(mesh) -> int:
  m = mesh_shape(mesh)
  return m["data"] * m["fsdp"]


def _local(n: int, shards: int) -> int:
  """Rows per device (a batch that does not divide is replicated, as spec_for drops the axis)."""
  return n // shards if n % shards == 0 else n


def param_bytes(cfg: qwen3.Qwen3Config, dtype, mesh=None) -> int:
  return tree_bytes(jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0), dtype)), mesh)


def adapter_bytes(cfg: qwen3.Qwen3Config, lcfg: lora.LoraConfig, mesh=None) -> int:
  if not lcfg.enabled:
    return 0
  decls = lora.adapter_decls(cfg, lcfg)
  tree = qwen3.unflatten({p: jax.ShapeDtypeStruct(d.shape, jnp.float32) for p, d in decls.items()})
  return tree_bytes(tree, mesh)


def trainable_bytes(cfg, lcfg, mesh=None) -> int:
  """fp32 trainable leaves: the adapters, or (full fine-tuning) an fp32 copy of every weight."""
  return adapter_bytes(cfg, lcfg, mesh) if lcfg.enabled else param_bytes(cfg, jnp.float32, mesh)


def kv_cache_bytes(cfg: qwen3.Qwen3Config, batch: int, cache_len: int, dtype, mesh=None) -> int:
  """K and V [L, B, S, KV, Dh] in the weights' dtype plus the [B, S] valid mask (qwen3.init_cache)."""
  return tree_bytes(jax.eval_shape(lambda: qwen3.init_cache(cfg, batch, cache_len, dtype)), mesh)


# --------------------------------------------------------------------------------------------------------------
# Activations. Coefficients are bytes per element of the tensors that dominate each phase, read off XLA's buffer
# assignment of the real programs (docs/memory.md has the table). `cpu=True` adds what only XLA:CPU allocates:
# fp32 copies of bf16 weights and of saved activations that feed its fp32 backward dots, and a transposed copy of
# a tied LM head; on TPU/GPU those fuse into the dots.

class _Dims(NamedTuple):
  L: int; D: int; F: int; H: int; K: int; Dh: int; V: int; a: int  # noqa: E702 (per-device sizes)


def _split(n: int, ways: int) -> int:
  return n // ways if n % ways == 0 else n


def _dims(cfg: qwen3.Qwen3Config, dtype, mesh) -> _Dims:
  tp = mesh_shape(mesh)["tensor"]
  return _Dims(cfg.num_layers, cfg.hidden_size, _split(cfg.intermediate_size, tp), _split(cfg.num_heads, tp),
               _split(cfg.num_kv_heads, tp), cfg.head_dim, _split(cfg.vocab_size, tp), jnp.dtype(dtype).itemsize)


def _layer_weight_elems(d: _Dims) -> int:
  """Matmul weights of one layer on one device (the model dim is gathered across fsdp for the dots)."""
  return d.D * (d.H + 2 * d.K) * d.Dh + d.H * d.Dh * d.D + 3 * d.D * d.F


def _lm_head_copies(cfg, d: _Dims, cpu: bool) -> int:
  # XLA:CPU feeds its dots an fp32 LM head, and transposes a tied embedding into [D, V] once.
  if not cpu:
    return 0
  return d.V * d.D * 4 + (d.V * d.D * d.a if cfg.tie_word_embeddings else 0)


def _sampling_temps(b: int, d: _Dims) -> int:
  # Sampling from [B, V] fp32 logits: scaled / truncated logits, probabilities, order keys, masks (~10 live).
  return 10 * b * d.V * 4


def _total(parts: dict[str, int], extra_keys=()) -> dict[str, int]:
  parts = {k: int(v) for k, v in parts.items()}
  parts["peak"] = sum(v for k, v in parts.items() if k not in extra_keys)
  return parts


def prefill(cfg, lcfg, shape: SampleShape, dtype, mesh=None, *, cpu: bool = False, unrolled: bool = False):
  """jopd.sampler's prefill: weights, adapters, the prompt batch, the KV cache it fills (an output) and the
  largest layer's working set."""
  d = _dims(cfg, dtype, mesh)
  b, p = _local(shape.batch, _batch_shards(mesh)), shape.prompt_len
  kv = kv_cache_bytes(cfg, shape.batch, p + shape.max_new, dtype, mesh)
  tok, scores = b * p, b * d.H * p * p
  act = max(4 * tok * d.F * 4 + 2 * tok * d.D * 4 + 2 * scores * 4, _sampling_temps(b, d))
  # XLA:CPU: the scanned prefill upcasts the stacked layer weights to fp32; the unrolled one (the sampler's CPU
  # path) copies each layer's bf16 weight slices, in the same temporary space where it later builds the cache
  # before writing the output (so the larger of the two).
  copies = max(kv, cfg.num_layers * _layer_weight_elems(d) * d.a) if unrolled else (
      cfg.num_layers * _layer_weight_elems(d) * 4)
  if qwen3.upcast_dots() and d.a < 4:  # and the fp32 operands of `qwen3.wide`, all layers' live at once
    copies += cfg.num_layers * _layer_weight_elems(d) * 4
  cpu_copies = copies if cpu else 0
  return _total({"weights": param_bytes(cfg, dtype, mesh), "adapters": adapter_bytes(cfg, lcfg, mesh),
                 "inputs": b * p * 5, "kv_cache": kv, "outputs": b * shape.max_new * 8, "activations": act,
                 "cpu_copies": cpu_copies})


def decode(cfg, lcfg, shape: SampleShape, dtype, mesh=None, *, cpu: bool = False, unrolled: bool = False):
  """jopd.sampler's decode loop: weights, adapters, the donated loop state (KV cache, output buffers) and one
  token's sampling temporaries."""
  d = _dims(cfg, dtype, mesh)
  b, s = _local(shape.batch, _batch_shards(mesh)), shape.prompt_len + shape.max_new
  act = _sampling_temps(b, d) + 2 * b * d.H * s * 4
  # XLA:CPU: the scan path upcasts the stacked layer weights to fp32 once per loop; the unrolled path copies each
  # layer's weight slices (bf16) once per loop.
  cpu_copies = (_lm_head_copies(cfg, d, cpu) + cfg.num_layers * _layer_weight_elems(d) * (d.a if unrolled else 4)
                if cpu else 0)
  return _total({"weights": param_bytes(cfg, dtype, mesh), "adapters": adapter_bytes(cfg, lcfg, mesh),
                 "kv_cache": kv_cache_bytes(cfg, shape.batch, s, dtype, mesh), "outputs": b * shape.max_new * 8,
                 "activations": act, "cpu_copies": cpu_copies})


def score(cfg, shape: ScoreShape, dtype, mesh=None, *, cpu: bool = False, lcfg: lora.LoraConfig | None = None):
  """jopd.scoring's program: weights, tokens, and the larger of one layer's attention (fp32 scores and
  probabilities) and one vocab chunk (fp32 logits [B, chunk, V] and their exponentials)."""
  d = _dims(cfg, dtype, mesh)
  b, t = _local(shape.batch, _batch_shards(mesh)), shape.length
  tok, scores = b * t, b * d.H * t * t
  logits = 2 * b * min(shape.chunk, t) * d.V * 4 + tok * d.D * 4
  layer = 2 * scores * 4 + 2 * tok * d.F * 4
  lcfg = lcfg or lora.LoraConfig(rank=0)
  return _total({"weights": param_bytes(cfg, dtype, mesh), "adapters": adapter_bytes(cfg, lcfg, mesh),
                 "inputs": tok * 5, "outputs": tok * 4, "activations": max(logits, layer),
                 "cpu_copies": (d.V * d.D * d.a if cpu and cfg.tie_word_embeddings else 0)})


def _residuals_per_token(cfg, d: _Dims, lcfg, remat: str, cpu: bool) -> tuple[float, float]:
  """(bytes per token, bytes per attention-score element) one layer saves for the backward pass. The XLA:CPU
  factors were fitted to its buffer assignment of the bench model's train step (docs/memory.md)."""
  r = lcfg.rank * len(lcfg.targets) if lcfg.enabled else 0
  if remat == "full":      # the layer input only (XLA:CPU also keeps an fp32 copy of it)
    return d.D * d.a * (3 if cpu else 1), 0.0
  proj = d.H * d.Dh + 2 * d.K * d.Dh + 2 * d.D + 2 * d.F + r      # outputs of the weight matmuls
  if remat == "dots":      # XLA:CPU also keeps fp32 and relaid-out copies of most of them
    return d.D * d.a + proj * d.a * (3.8 if cpu else 1), 0.0
  # 'none': every intermediate, attention probabilities in fp32 and bf16 (and an fp32 copy on CPU).
  per_token = (2 * d.D + d.H * d.Dh + d.K * d.Dh) * 4 + (2 * d.D + 2 * d.H * d.Dh + 2 * d.K * d.Dh + 6 * d.F + r) * d.a
  if cpu:
    per_token = 26 * d.D + 24 * d.F
  return per_token, (9.0 if cpu else 6.0)


def train_step(cfg, lcfg, shape: TrainShape, dtype, mesh=None, *, cpu: bool = False):
  """jopd.update.train_step with the OPD loss: weights, fp32 trainable leaves, Adam moments, the batch, gradients,
  saved activations (per the remat policy) and the larger of two phases' working sets: the vocab chunks of the
  loss (forward and backward), or one layer's backward (on XLA:CPU with fp32 copies of the frozen layer weights,
  which it makes for the backward pass only)."""
  full_ft = not lcfg.enabled
  act_dtype = jnp.float32 if full_ft else dtype
  d = _dims(cfg, act_dtype, mesh)
  rows = _local(shape.batch, _batch_shards(mesh))
  b, t = max(1, rows // shape.num_micro), shape.length
  tok, scores = b * t, b * d.H * t * t
  trainable = trainable_bytes(cfg, lcfg, mesh)
  per_tok, per_score = _residuals_per_token(cfg, d, lcfg, cfg.remat, cpu)
  saved = cfg.num_layers * (tok * per_tok + scores * per_score)
  logits = 2 * b * min(shape.logits_chunk, t) * d.V * 4 + tok * d.D * 4
  layer = 7 * scores + 26 * tok * d.F
  layer_copies = cfg.num_layers * _layer_weight_elems(d) * 4 if cpu and not full_ft else 0
  backward_wins = layer + layer_copies > logits
  grads = trainable * (2 if shape.num_micro > 1 else 1)
  head_copies = _lm_head_copies(cfg, d, cpu) if not full_ft else 0
  return _total({"weights": 0 if full_ft else param_bytes(cfg, dtype, mesh), "trainable": trainable,
                 "opt_state": 2 * trainable, "inputs": rows * t * 18, "grads": grads, "saved_activations": saved,
                 "activations": layer if backward_wins else logits,
                 "cpu_copies": head_copies + (layer_copies if backward_wins else 0)})
