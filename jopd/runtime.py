"""What the OPD trainer and SFT share around their host loops: run directory, compilation cache, model and
tokenizer loading, trainable/frozen split (LoRA or full), sharded optimizer state, checkpoint resume.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from jopd import checkpoint as ckpt_lib
from jopd import distributed
from jopd import mesh as mesh_lib
from models import hf, lora, qwen3

log = logging.getLogger("jopd")

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every manager detail at INFO


# Exit status of a process whose run failed because another process of the same run died or became unreachable;
# restarting all processes resumes from the last checkpoint.
PEER_LOST_EXIT_CODE = 43
_PEER_LOST_MARKERS = ("Gloo", "Connection closed by peer", "heartbeat", "CoordinationService", "Barrier failed",
                      "Socket closed")


def run_main(run_fn, c) -> None:
  """Calls `run_fn(c)`. In a multi-process run a failure ends this process at once, with a clear error: a normal
  exit would first wait for the other processes (orbax's background commit, jax.distributed's shutdown barrier),
  which blocks for minutes when one of them died. A lost peer surfaces within seconds as a failed collective
  (its sockets close), or at worst after jax.distributed's heartbeat timeout (100 s by default)."""
  try:
    run_fn(c)
  except BaseException as e:  # SystemExit too: its status is kept, the wait for peers is skipped
    if not jax.distributed.is_initialized():  # single process (never touch the backend before run_fn does)
      raise
    _abort(e)


def _abort(error: BaseException):
  if isinstance(error, SystemExit):
    code = error.code if isinstance(error.code, int) else 1
  elif any(m in str(error) for m in _PEER_LOST_MARKERS):
    code = PEER_LOST_EXIT_CODE
    log.error("process %d of %d: lost contact with another process of this run (%s: %s). It probably died or was "
              "killed; see its log. Exiting with status %d without waiting for it; restart all processes to "
              "resume from the last checkpoint.", jax.process_index(), jax.process_count(), type(error).__name__,
              str(error).splitlines()[0][:300], code)
  else:
    from jopd import cli  # the exit statuses of a single-process run (docs/errors.md)
    code = (cli.NONFINITE_EXIT_CODE if isinstance(error, FloatingPointError) else
            cli.USAGE_EXIT_CODE if cli.is_refusal(error) else 1)
    log.error("process %d of %d failed; exiting with status %d without waiting for the other processes",
              jax.process_index(), jax.process_count(), code, exc_info=error)
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def setup_run(c, name: str) -> str:
  """Creates log_path and turns on the persistent compilation cache; returns log_path (metrics.MetricsWriter
  writes config.json)."""
  if not c.log_path:
    # All processes must write to one directory: process 0's clock names it.
    default = os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    c.log_path = distributed.allgather_json(default)[0]
  if not c.log_path.startswith("gs://"):
    os.makedirs(c.log_path, exist_ok=True)
  cache_dir = c.compilation_cache_dir or os.path.join(c.log_path, "xla_cache")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # tests set 0 to cache every program
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _CompileStats.install()
  log.info("persistent compilation cache: %s (written by process 0)", cache_dir)
  return c.log_path


class _CompileStats:
  """Counts persistent compilation cache lookups (jax.monitoring events) of this process, so a restarted run
  can show that it loaded its programs instead of compiling them, and every XLA compilation (a backend-compile
  duration event each), so a run can show that nothing recompiles after warm-up."""
  hits = misses = compiled = 0
  _installed = False

  @classmethod
  def install(cls):
    if not cls._installed:
      jax.monitoring.register_event_listener(cls._on_event)
      jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
      cls._installed = True

  @classmethod
  def _on_duration(cls, event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      cls.compiled += 1

  @classmethod
  def _on_event(cls, event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      cls.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":
      cls.misses += 1


def compile_stats() -> dict[str, int]:
  """`compile/cache_hits` (programs loaded from the persistent cache) and `compile/cache_misses` (programs
  compiled) of this process since it started; after a restart misses stay 0 unless a new shape appears (programs
  faster to compile than jax_persistent_cache_min_compile_time_secs are never cached); `compile/xla_compiles`
  counts every program XLA compiled in this process (cache hits excluded), small host-side ones included."""
  return {"compile/cache_hits": _CompileStats.hits, "compile/cache_misses": _CompileStats.misses,
          "compile/xla_compiles": _CompileStats.compiled}


def log_compile_stats(when: str) -> None:
  log.info("compilation cache after %s: %d programs loaded from %s, %d compiled", when, _CompileStats.hits,
           jax.config.jax_compilation_cache_dir, _CompileStats.misses)


def param_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"--config.param_dtype={name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def resolve_model_path(name: str, what: str = "model_name") -> str:
  """A local checkpoint directory, or a Hugging Face hub name resolved through the local cache (downloaded
  only when the network allows it)."""
  if os.path.isdir(name):
    return name
  if name.startswith("gs://"):
    raise ValueError(f"--config.{what}={name!r}: copy gs:// model weights to local disk first "
                     "(`gcloud storage cp -r`); checkpoints, not base weights, are read from gs://")
  if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
    raise FileNotFoundError(f"--config.{what}={name!r}: no such directory (expected a transformers checkpoint "
                            "directory)")
  if name.count("/") != 1:
    raise FileNotFoundError(f"--config.{what}={name!r}: not a directory and not a hub name like 'Qwen/Qwen3-8B'")
  import huggingface_hub
  patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
  try:
    return huggingface_hub.snapshot_download(name, allow_patterns=patterns, local_files_only=True)
  except Exception:  # not cached: try the network
    try:
      return huggingface_hub.snapshot_download(name, allow_patterns=patterns)
    except Exception as e:
      raise FileNotFoundError(f"--config.{what}={name!r}: not in the local Hugging Face cache and could not be "
                              f"downloaded ({type(e).__name__}); pass a local directory") from e


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str):
  """The directory's own tokenizer (and chat template); refuses a directory without tokenizer files, where
  transformers would silently build an empty one."""
  if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise ValueError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer next to the "
                     "weights (tokenizer.save_pretrained) or pass --config.tokenizer_path")
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:
    raise ValueError(f"{path}: the tokenizer could not be loaded ({type(e).__name__}: {e})") from e


@dataclasses.dataclass
class Model:
  """A loaded model on the mesh: config, frozen (or, for full fine-tuning, initial) params, tokenizer."""
  cfg: qwen3.Qwen3Config
  params: Any
  tokenizer: Any
  path: str


def load_model(name: str, c, mesh, *, tokenizer_path: str = "", what: str = "model_name") -> Model:
  path = resolve_model_path(name, what)
  cfg = dataclasses.replace(qwen3.Qwen3Config.from_hf(path), remat=c.remat)
  abstract = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0), param_dtype(c.param_dtype)))
  _, params = hf.load_pretrained(path, dtype=param_dtype(c.param_dtype),
                                 shardings=mesh_lib.shardings_for(abstract, mesh))
  tokenizer = load_tokenizer(resolve_model_path(tokenizer_path, "tokenizer_path") if tokenizer_path else path)
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
                     f"{cfg.vocab_size}; ids past the embedding table cannot be scored (wrong tokenizer_path?)")
  return Model(cfg, params, tokenizer, path)


def lora_config(c) -> lora.LoraConfig:
  return lora.LoraConfig(rank=int(c.lora_rank), alpha=float(c.lora_alpha), targets=tuple(c.lora_targets))


def _place(tree, mesh):
  shardings = mesh_lib.shardings_for(jax.eval_shape(lambda: tree), mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def init_trainable(c, student: Model, mesh, key):
  """(trainable, frozen): LoRA adapters beside frozen params, or all params (fp32) for full fine-tuning.
  `load_checkpoint_path` (a jopd checkpoint or a PEFT adapter directory) replaces the initial trainable weights."""
  lcfg = lora_config(c)
  if lcfg.enabled:
    trainable = lora.init_adapters(student.cfg, lcfg, key)
    frozen = student.params
  else:
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), student.params)
    frozen = None
  if c.load_checkpoint_path:
    trainable = _load_initial_weights(c.load_checkpoint_path, student, lcfg, trainable)
  return _place(trainable, mesh), frozen


def _load_initial_weights(path: str, student: Model, lcfg: lora.LoraConfig, trainable):
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    from jopd import export
    adapters, peft_cfg = export.import_peft(path, student.cfg)
    if (peft_cfg.rank, peft_cfg.targets, peft_cfg.lm_head) != (lcfg.rank, lcfg.targets, lcfg.lm_head):
      raise ValueError(f"--config.load_checkpoint_path={path}: PEFT adapter has rank {peft_cfg.rank}, targets "
                       f"{peft_cfg.targets}; the run asks for lora_rank={lcfg.rank}, lora_targets={lcfg.targets}")
    loaded = adapters
  else:
    loaded, meta = ckpt_lib.load_trainable(path)
    if int(meta.get("lora_rank", -1)) != lcfg.rank:
      raise ValueError(f"--config.load_checkpoint_path={path}: checkpoint has lora_rank={meta.get('lora_rank')}, "
                       f"the run asks for lora_rank={lcfg.rank}")
  want = jax.tree.structure(trainable)
  if jax.tree.structure(loaded) != want:
    raise ValueError(f"--config.load_checkpoint_path={path}: its weights do not match the run's trainable tree "
                     f"(lora_targets or model differ)")
  log.info("loaded initial weights from %s (weights only; optimizer starts fresh)", path)
  return jax.tree.map(lambda x, ref: jnp.asarray(np.asarray(x), ref.dtype), loaded, trainable)


def init_opt_state(optimizer, trainable, mesh):
  """Optimizer state created directly with the shardings the rules table gives it."""
  abstract = jax.eval_shape(optimizer.init, trainable)
  return jax.jit(optimizer.init, out_shardings=mesh_lib.shardings_for(abstract, mesh))(trainable)


def run_meta(c, student: Model, extra: dict | None = None) -> dict:
  """What export and load_checkpoint_path need to interpret a checkpoint without the run's config file."""
  return {"config": json.loads(c.to_json_best_effort()), "model_name": student.path,
          "model_config": student.cfg.to_hf(), **lora_config(c).to_meta(), **(extra or {})}


def data_state(data) -> dict:
  """Every process's data iterator state, for Checkpointer.save(data_state=...): orbax writes JSON items from
  process 0 only, so the states are gathered (a collective: all processes call it)."""
  return {"process_count": jax.process_count(), "processes": distributed.allgather_json(data.get_state())}


def _own_data_state(saved: dict, where: str):
  """This process's entry of a `data_state(...)` dict; any other dict is a single-process iterator state."""
  if "processes" not in saved:
    return saved
  if saved["process_count"] != jax.process_count():
    raise ValueError(f"{where}: the data position was saved by {saved['process_count']} processes but this run "
                     f"has {jax.process_count()}; resume with the same process count, or start a new log_path "
                     "with --config.load_checkpoint_path to keep the weights only")
  return saved["processes"][jax.process_index()]


def restore_or_start(checkpointer, state: dict, data_state_setter=None):
  """Resumes from the latest checkpoint in the run's directory, if any. Returns (state, start_step)."""
  step = checkpointer.latest_step()
  if step is None:
    return state, 0
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  state, saved_data_state, _ = checkpointer.restore(step, abstract_state=abstract)
  if data_state_setter is not None and saved_data_state:
    data_state_setter(_own_data_state(saved_data_state, f"{checkpointer.directory}/{step}"))
  log.info("resumed from checkpoint at step %d", step)
  return state, int(step)

