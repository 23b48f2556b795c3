"""Orbax checkpoints of a run: one pytree `state` (trainable params or adapters, optimizer state, RNG, step) plus the
data-iterator position and the run config as JSON, saved atomically to a local or gs:// directory.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jopd import mesh as mesh_lib

log = logging.getLogger(__name__)

STATE, DATA_STATE, META = "state", "data_state", "meta"
# `state[TRAINABLE]` holds the trained weights (adapters, or full params when lora_rank=0); export and
# `load_checkpoint_path` read only this subtree.
TRAINABLE = "trainable"


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Explicit handlers let a fresh manager read item metadata and restore items without being told their types.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(STATE, ocp.args.PyTreeSave, ocp.handlers.PyTreeCheckpointHandler)
  registry.add(STATE, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler)
  for item in (DATA_STATE, META):
    registry.add(item, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
    registry.add(item, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
  return registry


def _check_json(obj: Any, what: str, path: str = "") -> None:
  """Refuses a value that would not survive a JSON round trip, naming the offending field."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"Checkpointer.save: {what}{path} has key {k!r} of type {type(k).__name__}; "
                        "JSON object keys must be strings")
      _check_json(v, what, f"{path}[{k!r}]")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      _check_json(v, what, f"{path}[{i}]")
  elif not (obj is None or isinstance(obj, (str, bool, int, float))):
    raise TypeError(f"Checkpointer.save: {what}{path} is a {type(obj).__name__}; only JSON values (dict with str "
                    "keys, list, str, int, float, bool, None) are accepted (tuples: use lists; ConfigDict: "
                    ".to_dict())")


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


class Checkpointer:
  """Saves and restores a run's checkpoints under `directory` (local path or gs://), keeping `max_to_keep`.

  Saves are asynchronous (device->host copy happens in `save`, the write in the background; `wait()` blocks) and
  atomic: orbax writes into a temporary directory and renames (or, on GCS, writes a commit marker) only when
  complete, so an interrupted save is never `latest_step()`. All processes of a multi-host run call every method.
  """

  def __init__(self, directory: str | epath.PathLike, max_to_keep: int | None = 3, *, async_save: bool = True,
               read_only: bool = False):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint (unfinished temporary directories are never counted)."""
    return self._manager.latest_step()

  def save(self, step: int, state, *, data_state: dict | None = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves `state` (a pytree of jax arrays, typed PRNG keys included) and the JSON dicts `data_state` (data
    iterator position) and `meta` (run config: model_name, lora_* fields, ...). Returns whether a save started;
    a step that already exists is not overwritten (e.g. a preemption save right after a periodic one)."""
    data_state = {} if data_state is None else data_state
    meta = {} if meta is None else meta
    _check_json(data_state, "data_state")
    _check_json(meta, "meta")
    if step in self._manager.all_steps():
      log.info("checkpoint: step %d already saved in %s; not saving it again", step, self.directory)
      return False
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), DATA_STATE: ocp.args.JsonSave(data_state),
                                 META: ocp.args.JsonSave(meta)})
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    """Blocks until background writes are finished (before exiting, or before reading what was saved)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"{self.directory}: no finished checkpoint to restore")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; available: {self.all_steps()}")
    return step

  def state_metadata(self, step: int | None = None) -> dict:
    """The saved state tree with orbax ArrayMetadata leaves (shape, dtype), without reading any array."""
    step = self._step(step)
    return self._manager.item_metadata(step)[STATE].tree

  def restore(self, step: int | None = None, abstract_state=None):
    """(state, data_state, meta) of `step` (default: latest). Arrays are placed with the shardings of
    `abstract_state` (a pytree of jax arrays or `jax.ShapeDtypeStruct`s with shardings), so each device reads only
    its shards; without `abstract_state` the state comes back as host numpy arrays."""
    step = self._step(step)
    if abstract_state is None:
      saved = self.state_metadata(step)
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    else:
      item = self._check_abstract(step, abstract_state)
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item, restore_args), DATA_STATE: ocp.args.JsonRestore(),
        META: ocp.args.JsonRestore()}))
    return out[STATE], out[DATA_STATE], out[META]

  def _check_abstract(self, step: int, abstract_state):
    """Names the first tensor whose path, shape or dtype differs from what was saved (orbax's own errors do not),
    and gives sharding-less leaves the default device (single process only)."""
    saved = {mesh_lib.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(self.state_metadata(step))[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    wanted = {mesh_lib.path_str(p) for p, _ in leaves}
    where = f"{self.directory}/{step}"
    for path in sorted(set(saved) - wanted)[:1] + sorted(wanted - set(saved))[:1]:
      side = "saved but not in abstract_state" if path in saved else "in abstract_state but not saved"
      raise ValueError(f"{where}: tensor {path!r} is {side}; restore with the same trainable/optimizer "
                       "structure the run was saved with (same lora_rank, lora_targets, optimizer)")
    out = []
    for key_path, leaf in leaves:
      path, m = mesh_lib.path_str(key_path), saved[mesh_lib.path_str(key_path)]
      if not _is_key(leaf) and (tuple(leaf.shape) != tuple(m.shape) or np.dtype(leaf.dtype) != np.dtype(m.dtype)):
        raise ValueError(f"{where}: tensor {path!r} was saved as {m.dtype}{list(m.shape)}, abstract_state asks for "
                         f"{np.dtype(leaf.dtype)}{list(leaf.shape)}")
      sharding = getattr(leaf, "sharding", None)
      if sharding is None:
        if jax.process_count() > 1:
          raise ValueError(f"{where}: abstract_state leaf {path!r} has no sharding; in a multi-process run every "
                           "leaf needs one (jopd.mesh.shardings_for)")
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_trainable(directory: str | epath.PathLike, step: int | None = None):
  """(trainable tree as host numpy arrays, meta) of a checkpoint, reading only `state['trainable']` (not the
  optimizer state): for export and for starting a run from another run's weights."""
  ckpt = Checkpointer(directory, max_to_keep=None, read_only=True)
  try:
    step = ckpt._step(step)
    saved = ckpt.state_metadata(step)
    if not isinstance(saved, dict) or TRAINABLE not in saved:
      keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
      raise KeyError(f"{ckpt.directory}/{step}: state has no {TRAINABLE!r} subtree (has {keys}); the trainer "
                     f"saves its trained weights under state[{TRAINABLE!r}]")
    item = {TRAINABLE: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[TRAINABLE])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckpt._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item, restore_args, partial_restore=True), META: ocp.args.JsonRestore()}))
    return out[STATE][TRAINABLE], out[META]
  finally:
    ckpt.close()
