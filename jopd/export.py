"""`python -m jopd.export`: a trainer checkpoint to a PEFT LoRA adapter directory or to a merged transformers
checkpoint; and `import_peft`, which reads a PEFT adapter directory back as jopd adapters.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import jax
import jax.numpy as jnp
from safetensors.numpy import load_file, save_file

from jopd import checkpoint, mesh as mesh_lib
from models import hf, lora, qwen3

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files of a base model directory that are not copied next to merged weights (they are rewritten or are weights).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                    ".h5", ".msgpack")


def resolve_model_dir(name: str) -> str:
  """A local directory as is; otherwise a Hugging Face hub name from the local cache (never downloads)."""
  if os.path.isdir(name):
    return name
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(name, local_files_only=True)
  except Exception as e:  # hub raises several error types for "not cached"
    raise FileNotFoundError(f"base model {name!r}: not a local directory and not in the local Hugging Face cache "
                            f"({type(e).__name__}); pass --base_model=/path/to/model") from e


# --------------------------------------------------------------------------------------------------------------
# PEFT directories.

def save_peft(out: str, cfg: qwen3.Qwen3Config, lora_cfg: lora.LoraConfig, adapters,
              base_model_name_or_path: str | None) -> None:
  """Writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads."""
  if not lora_cfg.enabled:
    raise ValueError("export --format=peft: this checkpoint is full fine-tuning (lora_rank=0); "
                     "use --format=merged")
  present = [t for t in lora.LAYER_TARGETS if t in (adapters.get("layers") or {})]
  present += ["lm_head"] if "lm_head" in adapters else []
  expected = list(lora_cfg.targets) + (["lm_head"] if lora_cfg.lm_head else [])
  if present != expected:
    raise ValueError(f"export: adapters hold targets {present} but the checkpoint meta says {expected}")
  os.makedirs(out, exist_ok=True)
  alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else float(lora_cfg.alpha)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": alpha,
      "target_modules": [lora.hf_module(cfg, t) for t in present],
      "base_model_name_or_path": base_model_name_or_path, "bias": "none", "lora_dropout": 0.0,
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
      "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
      "alpha_pattern": {}, "revision": None,
  }
  save_file(dict(lora.peft_tensors(cfg, adapters)), os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)


# adapter_config.json fields whose non-default values change the math in ways jopd does not implement.
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
                "lora_bias": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None, []),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layer_replication": (None,),
                "target_parameters": (None, []), "trainable_token_indices": (None,)}


def import_peft(path: str, cfg: qwen3.Qwen3Config):
  """(adapters, LoraConfig) from a PEFT LoRA adapter directory, for a teacher or a warm start."""
  config_file = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory)")
  with open(config_file) as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_file}: peft_type={config['peft_type']!r}; only 'LORA' adapters can be imported")
  for field, accepted in _UNSUPPORTED.items():
    if field in config and config[field] not in accepted:
      raise ValueError(f"{config_file}: {field}={config[field]!r} is not supported; jopd imports plain LoRA "
                       f"({field} must be {accepted[0]!r})")
  rank, alpha = int(config["r"]), float(config["lora_alpha"])
  if config.get("use_rslora"):
    # rsLoRA scales by alpha / sqrt(r); the same scale as plain LoRA with alpha * sqrt(r).
    alpha = alpha * math.sqrt(rank)
    log.info("%s: use_rslora: importing with equivalent lora_alpha=%g", config_file, alpha)
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (jopd reads safetensors adapters only)")
  adapters, targets = lora.adapters_from_peft(cfg, load_file(weights), rank, where=weights)
  modules = config.get("target_modules")
  if isinstance(modules, list):
    listed = {m.split(".")[-1] for m in modules}
    missing = sorted(listed - {lora.hf_module(cfg, t) for t in targets})
    if missing:
      raise ValueError(f"{weights}: target_modules lists {missing[0]!r} but the file holds no adapter for it")
  if not targets:
    raise ValueError(f"{weights}: holds no LoRA matrices")
  return adapters, lora.LoraConfig(rank=rank, alpha=alpha, targets=targets)


# --------------------------------------------------------------------------------------------------------------
# Merged checkpoints.

def _weights_of(cfg: qwen3.Qwen3Config, params, trainable, lora_cfg: lora.LoraConfig):
  """(cfg, params) with a checkpoint's trainable tree applied: adapters merged, or full params replacing base."""
  if lora_cfg.enabled:
    return lora.merged_config(cfg, trainable), lora.merge(cfg, params, trainable, lora_cfg.scale)
  want = {p: d.shape for p, d in qwen3.param_decls(cfg).items()}
  got = {mesh_lib.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  if got != want:
    diff = sorted(set(want) ^ set(got)) or [p for p in want if want[p] != got[p]]
    raise ValueError(f"export: full-fine-tuning params do not match the base config at {diff[0]!r} "
                     f"(checkpoint: {got.get(diff[0])}, base config: {want.get(diff[0])})")
  dtype = jax.tree.leaves(params)[0].dtype
  return cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), trainable)


def save_merged(out: str, base_dir: str, trainable, lora_cfg: lora.LoraConfig, dtype=None) -> None:
  """A transformers checkpoint of base + trainable (merged weights, config.json, tokenizer and generation files
  copied from the base directory). `dtype` defaults to the base checkpoint's dtype."""
  if dtype is None:
    with open(os.path.join(base_dir, "config.json")) as f:
      raw = json.load(f)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
  cfg, params = hf.load_pretrained(base_dir, dtype=jnp.dtype(dtype))
  cfg, params = _weights_of(cfg, params, trainable, lora_cfg)
  hf.save_pretrained(out, cfg, params)
  if jax.process_index() != 0:
    return
  for name in sorted(os.listdir(base_dir)):
    src = os.path.join(base_dir, name)
    if os.path.isfile(src) and name != "config.json" and not name.endswith(_WEIGHT_SUFFIXES):
      shutil.copy2(src, os.path.join(out, name))


def export(checkpoint_dir: str, out: str, fmt: str, *, step: int | None = None, base_model: str | None = None,
           dtype: str | None = None) -> str:
  """Exports step `step` (default: latest) of a trainer checkpoint directory; returns `out`."""
  if fmt not in ("peft", "merged"):
    raise ValueError(f"--format={fmt!r}; expected 'peft' or 'merged'")
  trainable, meta = checkpoint.load_trainable(checkpoint_dir, step)
  lora_cfg = lora.LoraConfig.from_meta(meta)
  base = base_model or meta.get("model_name")
  if not base:
    raise ValueError(f"{checkpoint_dir}: checkpoint meta has no 'model_name'; pass --base_model")
  # load_checkpoint_path only sets the trainable weights' initial values (jopd.runtime.init_trainable): the
  # saved adapters are always relative to model_name.
  base_dir = resolve_model_dir(base)
  if fmt == "peft":
    save_peft(out, qwen3.Qwen3Config.from_hf(base_dir), lora_cfg, trainable, base)
  else:
    save_merged(out, base_dir, trainable, lora_cfg, dtype)
  log.info("export: wrote %s (%s) from %s", out, fmt, checkpoint_dir)
  return out


def _main() -> None:
  from absl import app, flags   # flags are defined only when run as a program, so importing never clashes

  flags.DEFINE_string("checkpoint", None, "the trainer's orbax checkpoint directory (log_path/checkpoints)")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_enum("format", "peft", ["peft", "merged"], "PEFT LoRA adapter, or a full merged checkpoint")
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
  flags.DEFINE_string("base_model", None, "base model directory or hub name (default: model_name in the meta)")
  flags.DEFINE_string("dtype", None, "merged weight dtype (default: the base checkpoint's)")
  flags.mark_flags_as_required(["checkpoint", "out"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    export(F.checkpoint, F.out, F.format, step=F.step, base_model=F.base_model, dtype=F.dtype)

  app.run(main)


if __name__ == "__main__":
  _main()
