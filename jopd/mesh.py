"""Device mesh ('data', 'fsdp', 'tensor'), the one partition-rules table for every tensor the trainer holds, and
the multi-host initialiser every entry point calls first.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from models import lora, qwen3

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis (as declared in models/qwen3.py and models/lora.py) -> mesh axes (design §6).
LOGICAL_AXES: dict[str, Any] = {
    "batch": BATCH,
    "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "embed": "fsdp",
    "layers": None, "norm": None, "head_dim": None, "lora_rank": None, "seq": None,
}

# Declarations are read from a 1-sized config: the logical axes of a weight do not depend on its sizes.
_AXES_CFG = qwen3.Qwen3Config(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
                              num_kv_heads=1, head_dim=2, tie_word_embeddings=False)


def _rules() -> list[tuple[str, Any]]:
  """(regex searched in the '/'-joined tree path, logical axes or a PartitionSpec); first match wins. Rules match
  path suffixes, so optimizer state (`.../mu/layers/q/a`) and nested trees (`state/trainable/...`) resolve to
  the leaf they shadow. A trailing `...` leaves the remaining dims unsharded."""
  adapters = lora.adapter_decls(_AXES_CFG, lora.LoraConfig(rank=1, targets=lora.ALL_TARGETS))
  rules = [(rf"(^|/){re.escape(p)}$", d.axes) for p, d in adapters.items()]
  rules += [(rf"(^|/){re.escape(p)}$", d.axes) for p, d in qwen3.param_decls(_AXES_CFG).items()]
  rules += [
      # KV cache of qwen3.init_cache: k/v [L, B, S, KV, Dh], valid [B, S], position [B].
      (r"(^|/)(k|v)$", ("layers", "batch", "seq", "kv_heads", "head_dim")),
      (r"(^|/)valid$", ("batch", "seq")),
      (r"(^|/)position$", ("batch",)),
      # Batch arrays live under a 'batch' key: leading dim is the batch.
      (r"(^|/)batch(/|$)", ("batch", ...)),
      # Counters, RNG keys, step: tiny, replicated.
      (r"(^|/)(step|count|index|rng|key)$", P()),
  ]
  return rules


RULES = _rules()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None):
  """A mesh over `devices` (default: all global devices) with explicit Auto axis types; one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive, "
                     "with at most one -1 (fill)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): {len(devices)} devices are not "
                       f"divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): {math.prod(shape)} != "
                     f"{len(devices)} devices; pick sizes whose product is {len(devices)} or set one to -1")
  mesh = jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
  log.info("mesh: %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
  return mesh


def path_str(key_path) -> str:
  """A jax key path as 'a/b/0/c' (dict keys, attribute names of optax states, sequence indices)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def logical_axes(path: str, rules=None):
  """The rule value (logical axes tuple or PartitionSpec) for a path, or None when no rule matches."""
  for pattern, value in RULES if rules is None else rules:
    if re.search(pattern, path):
      return value
  return None


def spec_for(path: str, shape: Sequence[int], mesh, rules=None) -> P:
  """The PartitionSpec of one tensor. Mesh axes that do not divide their dim are dropped with a warning."""
  ndim = len(shape)
  value = logical_axes(path, rules)
  if value is None:
    if ndim:
      log.warning("mesh: no partition rule matches %r (shape %s); replicating it. Add a rule to jopd.mesh.RULES "
                  "or put batch arrays under a 'batch' key.", path, tuple(shape))
    return P()
  if isinstance(value, P):
    entries = list(value)
    if len(entries) > ndim:
      raise ValueError(f"mesh rule for {path!r}: {value} has {len(entries)} entries but the tensor has shape "
                       f"{tuple(shape)}")
    entries += [None] * (ndim - len(entries))
  else:
    names = list(value)
    if names and names[-1] is Ellipsis:
      names = names[:-1] + [None] * (ndim - len(names) + 1)
    if len(names) != ndim:
      raise ValueError(f"mesh rule for {path!r}: logical axes {tuple(value)} do not fit shape {tuple(shape)}; "
                       f"a tensor matching this rule must have {len(names)} dims")
    entries = []
    for name in names:
      if name is not None and name not in LOGICAL_AXES:
        raise ValueError(f"mesh rule for {path!r}: unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
      entries.append(None if name is None else LOGICAL_AXES[name])

  used: set[str] = set()
  spec = []
  for dim, (size, entry) in enumerate(zip(shape, entries)):
    wanted = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, prod = [], 1
    for ax in wanted:
      ax_size = mesh.shape[ax]
      if ax in used:
        log.warning("mesh: %r dim %d: mesh axis %r already shards another dim of this tensor; dropped",
                    path, dim, ax)
      elif size % (prod * ax_size):
        log.warning("mesh: %r dim %d (size %d) is not divisible by mesh axis %r (size %d); that axis is dropped "
                    "and the dim is %s", path, dim, size, ax, ax_size,
                    f"sharded over {kept} only" if kept else "replicated")
      else:
        kept.append(ax)
        prod *= ax_size
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def shardings_for(tree, mesh, rules=None):
  """A pytree of NamedSharding matching `tree` (arrays or abstract `jax.ShapeDtypeStruct`s from eval_shape)."""
  def one(key_path, leaf):
    return NamedSharding(mesh, spec_for(path_str(key_path), leaf.shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


# --------------------------------------------------------------------------------------------------------------
# Multi-host initialisation.

def _env_int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except KeyError:
    raise ValueError(f"environment: {name} is not set; JOPD_COORDINATOR, JOPD_NUM_PROCESSES and JOPD_PROCESS_ID "
                     "must be set together (e.g. 127.0.0.1:1234, 2, 0)") from None
  except ValueError:
    raise ValueError(f"environment: {name}={env[name]!r} is not an integer") from None


def cluster_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """How this process should join a cluster: explicit JOPD_* variables, SLURM (jax detects the coordinator from
  SLURM_* itself), a Cloud TPU VM (auto-discovery), or None for a single process."""
  env = os.environ if env is None else env
  if any(k in env for k in ("JOPD_COORDINATOR", "JOPD_NUM_PROCESSES", "JOPD_PROCESS_ID")):
    if "JOPD_COORDINATOR" not in env:
      raise ValueError("environment: JOPD_COORDINATOR is not set; JOPD_COORDINATOR, JOPD_NUM_PROCESSES and "
                       "JOPD_PROCESS_ID must be set together (e.g. 127.0.0.1:1234, 2, 0)")
    n, i = _env_int(env, "JOPD_NUM_PROCESSES"), _env_int(env, "JOPD_PROCESS_ID")
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"environment: JOPD_PROCESS_ID={i} must be in [0, JOPD_NUM_PROCESSES={n})")
    if n == 1:
      return None
    return {"kind": "explicit", "coordinator_address": env["JOPD_COORDINATOR"], "num_processes": n,
            "process_id": i}
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return {"kind": "slurm"}
  if _on_cloud_tpu_vm():
    return {"kind": "tpu"}
  return None


def _on_cloud_tpu_vm() -> bool:
  # jax decides this at import (libtpu present and TPU chips found) without starting a backend; starting one
  # (jax.devices()) before jax.distributed.initialize() would make initialisation impossible.
  try:
    from jax._src import cloud_tpu_init
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return "TPU_WORKER_HOSTNAMES" in os.environ


def initialize(env: Mapping[str, str] | None = None) -> None:
  """Joins the cluster this process belongs to (no-op for a single process or when already initialised), then
  logs the process index/count. Must run before anything touches a jax backend."""
  cluster = None if jax.distributed.is_initialized() else cluster_from_env(env)
  if cluster is not None:
    kind = cluster.pop("kind")
    if kind != "tpu":
      # CPU processes need gloo to run cross-process collectives; GPU backends ignore this setting.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("mesh: joining the cluster (%s): %s", kind, cluster or "auto-detected")
    jax.distributed.initialize(**cluster)
  log.info("mesh: process %d of %d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count(), jax.default_backend())
