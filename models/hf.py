"""Hugging Face checkpoints <-> Qwen3 params: streamed safetensors loading (optionally straight into shards)
and saving a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Only safetensors are read; pickle-based `pytorch_model.bin` checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models import qwen3

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint directory whose tensors do not match its config."""


def _np_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the index file, the single file or every *.safetensors file."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' object")
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    missing = sorted({f for f in files.values() if not os.path.exists(f)})
    if missing:
      raise CheckpointError(f"{index}: lists {missing[0]}, which does not exist")
    return files
  paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not paths:
    pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
               if os.path.exists(os.path.join(path, f))]
    if pickles:
      raise CheckpointError(
          f"{path}: only {pickles[0]} found. jopd loads safetensors only and never unpickles a checkpoint; "
          "convert it first, e.g. `AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
          "safe_serialization=True)` in an environment you trust.")
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file")
  files = {}
  for p in paths:
    try:
      with safe_open(p, framework="numpy") as f:
        files.update({name: p for name in f.keys()})
    except Exception as e:  # safetensors raises its own error types for truncated headers
      raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
  return files


class _Reader:
  """Reads one tensor at a time, keeping each safetensors file open once."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self._open: dict[str, Any] = {}

  def _handle(self, name: str):
    file = self.files[name]
    if file not in self._open:
      try:
        self._open[file] = safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    return self._open[file]

  def get(self, name: str) -> np.ndarray:
    try:
      return self._handle(name).get_tensor(name)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(
          f"{self.files[name]}: tensor {name!r} could not be read ({e}); is the file truncated?") from e

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())


def _hf_layer_shape(decl: qwen3.ParamDecl, stacked: bool) -> tuple[int, ...]:
  shape = decl.shape[1:] if stacked else decl.shape
  if decl.in_dims == 0:
    return shape
  return (math.prod(shape[decl.in_dims:]), math.prod(shape[:decl.in_dims]))


def _from_hf(t: np.ndarray, decl: qwen3.ParamDecl, stacked: bool) -> np.ndarray:
  shape = decl.shape[1:] if stacked else decl.shape
  return (t.T if decl.in_dims else t).reshape(shape)


def _to_hf(x: np.ndarray, decl: qwen3.ParamDecl) -> np.ndarray:
  if decl.in_dims == 0:
    return x
  return np.ascontiguousarray(x.reshape(math.prod(x.shape[:decl.in_dims]), -1).T)


def _hf_names(path: str, decl: qwen3.ParamDecl, num_layers: int) -> list[str]:
  if path.startswith("layers/"):
    return [decl.hf_name.format(i=i) for i in range(num_layers)]
  return [decl.hf_name]


def load_pretrained(path: str, dtype=jnp.bfloat16, shardings: Any = None) -> tuple[qwen3.Qwen3Config, dict]:
  """Loads a transformers Qwen3 checkpoint directory into (cfg, params).

  Tensors are read one parameter at a time, converted to `dtype` on the host and placed on devices (with the
  matching leaf of `shardings`, a params-shaped pytree of `jax.sharding.Sharding`, when given), so the host never
  holds more than one stacked parameter.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory (expected a transformers checkpoint directory)")
  cfg = qwen3.Qwen3Config.from_hf(path)
  files = _weight_files(path)
  reader = _Reader(files)
  decls = qwen3.param_decls(cfg)
  expected = {n for p, d in decls.items() for n in _hf_names(p, d, cfg.num_layers)}
  missing = sorted(expected - set(files))
  if missing:
    raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
  allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  unexpected = sorted(set(files) - expected - allowed_extra)
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                          "is this a Qwen3 checkpoint matching its config.json?")

  flat_shardings = _flat(shardings) if shardings is not None else {}
  np_dtype = _np_dtype(dtype)
  flat = {}
  for p, decl in decls.items():
    stacked = p.startswith("layers/")
    want = _hf_layer_shape(decl, stacked)
    names = _hf_names(p, decl, cfg.num_layers)
    for name in names:
      got = reader.shape(name)
      if got != want:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, expected {want} from config.json")
    host = np.empty(decl.shape, np_dtype)
    for i, name in enumerate(names):
      t = _from_hf(reader.get(name), decl, stacked).astype(np_dtype)
      if stacked:
        host[i] = t
      else:
        host[...] = t
    sharding = flat_shardings.get(p)
    if sharding is None:
      flat[p] = jnp.asarray(host)
    else:
      flat[p] = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    del host
  return cfg, qwen3.unflatten(flat)


def _flat(tree) -> dict[str, Any]:
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in key_path)] = leaf
  return out


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_tensors(cfg: qwen3.Qwen3Config, params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, [out, in] array) for every weight, one at a time."""
  flat = _flat(params)
  for p, decl in qwen3.param_decls(cfg).items():
    x = _host(flat[p])
    if p.startswith("layers/"):
      for i, name in enumerate(_hf_names(p, decl, cfg.num_layers)):
        yield name, _to_hf(x[i], decl)
    else:
      yield decl.hf_name, _to_hf(x, decl)


def save_pretrained(path: str, cfg: qwen3.Qwen3Config, params: dict, *, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json and safetensors shards (with an index file when there is more than one); each shard is
  written as soon as it is full, so the host holds at most one shard."""
  os.makedirs(path, exist_ok=True)
  writer = jax.process_index() == 0
  dtype = jax.tree_util.tree_leaves(params)[0].dtype
  files: list[tuple[str, list[str], int]] = []
  shard: dict[str, np.ndarray] = {}

  def flush():
    if shard:
      file = f"shard-{len(files):05d}.safetensors.tmp"
      if writer:
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
      files.append((file, list(shard), sum(t.nbytes for t in shard.values())))
      shard.clear()

  for name, t in hf_tensors(cfg, params):
    if shard and sum(x.nbytes for x in shard.values()) + t.nbytes > max_shard_bytes:
      flush()
    shard[name] = t
  flush()
  if not writer:
    return
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf() | {"dtype": str(jnp.dtype(dtype))}, f, indent=2)
  if len(files) == 1:
    os.replace(os.path.join(path, files[0][0]), os.path.join(path, SINGLE_FILE))
    return
  weight_map = {}
  for i, (tmp, names, _) in enumerate(files):
    file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    os.replace(os.path.join(path, tmp), os.path.join(path, file))
    weight_map.update({name: file for name in names})
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": sum(n for *_, n in files)}, "weight_map": weight_map}, f, indent=2)
