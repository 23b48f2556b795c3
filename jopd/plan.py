"""Pick a mesh before renting it: bytes per device of the sample, score and train programs for a run config, from
jopd.memory's model and from XLA's own memory analysis of the real programs compiled (never run) for that mesh.

  python -m jopd.plan --config=configs/deepmath.py --mesh=1,16,2 --devices=v5p-64 --teacher=Qwen/Qwen3-32B

`--mesh` is data,fsdp,tensor (one may be -1); `--devices` a count or a device kind (v5p-64, v4-32, v5e-16,
v6e-8, h100-8, ...; default: the mesh's size). The programs are compiled for XLA:CPU over that many simulated
devices (the process re-executes itself with --xla_force_host_platform_device_count), with `--layers` layers
(scan over layers: compile time does not depend on depth, ~5-30 s a program); XLA's numbers at two depths are
extrapolated linearly to the full depth. Models are known names (Qwen3-0.6B ... Qwen3-32B, config dicts below,
no download) or local checkpoint directories.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jopd import buckets, memory, scoring, update
from jopd import mesh as mesh_lib
from jopd import runtime, sampler
from jopd import teachers as teachers_lib
from jopd import train
from models import lora, qwen3

# The run config flag is jopd.train's own (--config=configs/x.py --config.field=value), so a plan reads exactly
# what a run would.
_CONFIG = train.CONFIG_FLAG
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor mesh sizes; one may be -1 (fill)")
_DEVICES = flags.DEFINE_string("devices", "", "device count or kind (v5p-64, v6e-8, h100-8); default: mesh size")
_STUDENT = flags.DEFINE_string("student", "", "student model (default: the config's model_name)")
_TEACHER = flags.DEFINE_string("teacher", "", "teacher model (default: the config's largest teacher)")
_LAYERS = flags.DEFINE_string("layers", "2,3", "layer counts to compile (two: extrapolated to full depth); "
                              "'' skips compiling")

# Hugging Face config.json fields of the Qwen3 dense models (read by qwen3.Qwen3Config.from_hf).
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu", attention_bias=False)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen3-0.6B": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-4B": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "Qwen3-14B": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, tie_word_embeddings=False),
    "Qwen3-32B": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, tie_word_embeddings=False),
}

# Device kind -> (devices per name unit: 'v5p-64' counts TensorCores, 2 per chip; memory per device in GiB).
DEVICE_KINDS = {"v4": (0.5, 32), "v5p": (0.5, 95), "v5e": (1, 16), "v5litepod": (1, 16), "v6e": (1, 32),
                "h100": (1, 80), "h200": (1, 141), "a100": (1, 80), "b200": (1, 180), "cpu": (1, None)}
GiB = 2**30


def model_config(name: str, remat: str = "none") -> qwen3.Qwen3Config:
  """A known model name ('Qwen/Qwen3-8B', 'Qwen3-8B-Base': base and instruct share a shape) or a local
  checkpoint directory."""
  key = re.sub(r"-(Base|Instruct|FP8)$", "", os.path.basename(name.rstrip("/")))
  if key in KNOWN_MODELS:
    cfg = qwen3.Qwen3Config.from_hf(KNOWN_MODELS[key])
  elif os.path.isdir(name):
    cfg = qwen3.Qwen3Config.from_hf(name)
  else:
    raise ValueError(f"plan: model {name!r} is neither a known name ({', '.join(KNOWN_MODELS)}) nor a local "
                     "checkpoint directory")
  return dataclasses.replace(cfg, remat=remat)


def device_kind(spec: str, mesh_size: int) -> tuple[int, float | None, str]:
  """(device count, bytes per device or None, label) from '32', 'v5p-64', 'h100-8' or '' (the mesh's size)."""
  if not spec:
    return mesh_size, None, f"{mesh_size} devices"
  if spec.isdigit():
    return int(spec), None, f"{spec} devices"
  m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", spec.lower())
  if not m or m.group(1) not in DEVICE_KINDS:
    raise ValueError(f"--devices={spec!r}: expected a count or KIND-N with KIND one of {sorted(DEVICE_KINDS)}")
  per, gib = DEVICE_KINDS[m.group(1)]
  n = int(int(m.group(2)) * per)
  return n, None if gib is None else gib * GiB, f"{spec} ({n} devices{f' of {gib} GiB' if gib else ''})"


def parse_mesh(text: str, devices: int | None) -> dict[str, int]:
  try:
    sizes = [int(s) for s in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3 or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"--mesh={text!r}: expected data,fsdp,tensor sizes like 1,16,2 (one may be -1)")
  if -1 in sizes:
    known = -math.prod(sizes)
    if devices is None or devices % known:
      raise ValueError(f"--mesh={text!r}: -1 needs --devices divisible by {known}")
    sizes[sizes.index(-1)] = devices // known
  if devices is not None and math.prod(sizes) != devices:
    raise ValueError(f"--mesh={text!r} has {math.prod(sizes)} devices, --devices gives {devices}")
  return dict(zip(mesh_lib.AXES, sizes))


# --------------------------------------------------------------------------------------------------------------
# What one step of a run asks of each program (the shapes the trainer's buckets give, worst case).

@dataclasses.dataclass(frozen=True)
class Workload:
  student: qwen3.Qwen3Config
  teacher: qwen3.Qwen3Config
  lora: lora.LoraConfig
  param_dtype: Any
  sample: memory.SampleShape
  score: memory.ScoreShape
  train: memory.TrainShape
  optimizer: Any = None
  loss_args: tuple = (1.0, 20.0, "sum")   # opd_loss's temperature, ratio_log_cap, normalization

  def with_layers(self, n: int) -> "Workload":
    return dataclasses.replace(self, student=dataclasses.replace(self.student, num_layers=n),
                               teacher=dataclasses.replace(self.teacher, num_layers=n))


def workload(c, student: qwen3.Qwen3Config, teacher: qwen3.Qwen3Config, shards: int) -> Workload:
  """The trainer's shapes for config `c`: all groups_per_batch x group_size rows sampled in one call, scored in
  one call, updated in num_substeps steps of micro_batch_size rows; prompts at max_prompt_tokens."""
  rows = int(c.groups_per_batch) * int(c.group_size)
  prompt = buckets.length_bucket(int(c.max_prompt_tokens))
  new = buckets.length_bucket(int(c.max_tokens))
  sample_rows = buckets.batch_bucket(rows, shards)
  full = buckets.length_bucket(int(c.max_prompt_tokens) + int(c.max_tokens))
  score_rows = buckets.batch_bucket(rows, shards)
  train_rows = buckets.batch_bucket(-(-rows // int(c.num_substeps)), shards)
  micro = update.num_micro_batches(train_rows, int(c.micro_batch_size))
  return Workload(
      student=student, teacher=teacher, lora=runtime.lora_config(c), param_dtype=runtime.param_dtype(c.param_dtype),
      sample=memory.SampleShape(sample_rows, prompt, new),
      score=memory.ScoreShape(score_rows, full, scoring.auto_chunk_size(score_rows, teacher.vocab_size, full)),
      train=memory.TrainShape(train_rows, full, micro), optimizer=update.make_optimizer(c, 1000),
      loss_args=(float(c.temperature), float(c.ratio_log_cap) or None, c.loss_normalization))


# --------------------------------------------------------------------------------------------------------------
# The real programs, lowered on abstract inputs (shapes, dtypes and the shardings a run would give them).

def _placed(make, mesh):
  """Abstract arrays of `make()`'s tree, sharded by jopd.mesh's rules."""
  shapes = jax.eval_shape(make)
  shardings = mesh_lib.shardings_for(shapes, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _rows(shape, dtype, mesh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=scoring.batch_sharding(mesh)[0])


def _params(cfg, dtype, mesh):
  return _placed(lambda: qwen3.init_params(cfg, jax.random.key(0), dtype), mesh)


def _adapters(cfg, lcfg, mesh):
  return _placed(lambda: lora.init_adapters(cfg, lcfg, jax.random.key(0)), mesh) if lcfg.enabled else None


def lower_sample(w: Workload, mesh, unrolled: bool = False):
  """(prefill, decode loop) of jopd.sampler for the student with its adapters, lowered."""
  cfg, s = w.student, w.sample
  params, adapters = _params(cfg, w.param_dtype, mesh), _adapters(cfg, w.lora, mesh)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sp = sampler.SamplingParams(np.float32(1.0), np.int32(0), np.float32(1.0))
  stop_ids, max_new, scale = np.full((4,), -1, np.int32), np.int32(s.max_new), np.float32(w.lora.scale)
  prefill = sampler._prefill.lower(
      cfg, params, adapters, scale, _rows((s.batch, s.prompt_len), jnp.int32, mesh),
      _rows((s.batch, s.prompt_len), jnp.bool_, mesh), _rows((s.batch,), jnp.bool_, mesh), rng, sp, stop_ids,
      max_new, cache_len=s.prompt_len + s.max_new, max_len=s.max_new, mesh=mesh, unrolled=unrolled)
  state = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), prefill.out_info)
  decode = sampler._decode.lower(cfg, params, adapters, scale, state, sp, stop_ids, max_new, mesh=mesh,
                                 unrolled=unrolled)
  return prefill, decode


def lower_score(w: Workload, mesh):
  """jopd.scoring's program for the teacher (no adapters) over the step's rows."""
  cfg, s = w.teacher, w.score
  tokens = _rows((s.batch, s.length), jnp.int32, mesh)
  return scoring._score.lower(cfg, _params(cfg, w.param_dtype, mesh), None, np.float32(1.0), np.float32(1.0),
                              tokens, _rows((s.batch, s.length), jnp.bool_, mesh), chunk_size=s.chunk,
                              batch_sharding=scoring.batch_sharding(mesh)[0])


def train_batch(batch: int, length: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """jopd.train.build_batch's arrays, abstract, rows sharded as update.put_batch shards them."""
  dtypes = {"tokens": jnp.int32, "attention_mask": jnp.bool_, "targets": jnp.int32, "loss_mask": jnp.bool_,
            "sampling_logprobs": jnp.float32, "advantages": jnp.float32}
  return {k: _rows((batch, length), d, mesh) for k, d in dtypes.items()}


def lower_train(w: Workload, mesh):
  """jopd.update.train_step with jopd.train.opd_loss (LoRA or full fine-tuning), lowered."""
  cfg, s, lcfg = w.student, w.train, w.lora
  params = _params(cfg, w.param_dtype, mesh)
  if lcfg.enabled:
    trainable, frozen = _adapters(cfg, lcfg, mesh), params
  else:
    trainable, frozen = _placed(lambda: qwen3.init_params(cfg, jax.random.key(0), jnp.float32), mesh), None
  opt_state = jax.eval_shape(w.optimizer.init, trainable)
  opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_state,
                           mesh_lib.shardings_for(opt_state, mesh))
  loss_fn = functools.partial(train.opd_loss, cfg, lcfg.enabled, lcfg.scale, *w.loss_args, s.logits_chunk)
  return update.train_step.lower(trainable, opt_state, frozen, train_batch(s.batch, s.length, mesh),
                                 loss_fn=loss_fn, optimizer=w.optimizer, num_micro=s.num_micro)


def compile_all(w: Workload, mesh, unrolled: bool = False) -> dict[str, dict[str, float]]:
  """Program name -> XLA's memory analysis (bytes per device, jopd.memory.measured) and compile seconds."""
  out = {}
  prefill, decode = lower_sample(w, mesh, unrolled)
  for name, lowered in (("prefill", prefill), ("decode", decode), ("score", lower_score(w, mesh)),
                        ("train_step", lower_train(w, mesh))):
    t = time.perf_counter()
    compiled = lowered.compile()
    out[name] = dict(memory.measured(compiled), compile_s=time.perf_counter() - t)
  return out


# --------------------------------------------------------------------------------------------------------------
# Prediction beside XLA, and the command line.

PROGRAMS = ("prefill", "decode", "score", "train_step")


def predict(w: Workload, mesh, cpu: bool = False, unrolled: bool = False) -> dict[str, dict[str, int]]:
  """jopd.memory's bytes per device for each program of one step of the run."""
  return {
      "prefill": memory.prefill(w.student, w.lora, w.sample, w.param_dtype, mesh, cpu=cpu, unrolled=unrolled),
      "decode": memory.decode(w.student, w.lora, w.sample, w.param_dtype, mesh, cpu=cpu, unrolled=unrolled),
      "score": memory.score(w.teacher, w.score, w.param_dtype, mesh, cpu=cpu),
      "train_step": memory.train_step(w.student, w.lora, w.train, w.param_dtype, mesh, cpu=cpu),
  }


def xla_at_depth(w: Workload, mesh, depths: list[int], log=print) -> tuple[dict[str, dict], dict[str, float]]:
  """XLA's memory analysis compiled at `depths` layers, extrapolated linearly to the full depth (weights, KV cache
  and saved activations grow by one layer's worth per layer; the rest does not), and compile seconds."""
  runs = {}
  for n in depths:
    t = time.perf_counter()
    runs[n] = compile_all(w.with_layers(n), mesh)
    log(f"# compiled the 4 programs at {n} layers in {time.perf_counter() - t:.1f}s")
  seconds = {p: max(r[p]["compile_s"] for r in runs.values()) for p in PROGRAMS}
  if len(depths) == 1:
    return runs[depths[0]], seconds
  (n0, r0), (n1, r1) = sorted(runs.items())[:2]
  out = {}
  for p in PROGRAMS:
    full = (w.teacher if p == "score" else w.student).num_layers
    out[p] = {k: int(r0[p][k] + (r1[p][k] - r0[p][k]) * (full - n0) / (n1 - n0))
              for k in ("arguments", "outputs", "aliased", "temp", "peak")}
  return out, seconds


def report(w: Workload, mesh_sizes, hbm, xla=None, seconds=None, depth_note="", out=print) -> dict:
  """Prints the table; returns the numbers (bytes per device) for the JSON line and tests."""
  target = predict(w, mesh_sizes)
  cpu = predict(w, mesh_sizes, cpu=True)
  unit, scale = ("GiB", GiB) if max(v["peak"] for v in cpu.values()) >= GiB else ("MiB", 2**20)
  cell = lambda x: f"{x / scale:12.2f}"
  rows = ["weights", "adapters", "trainable", "opt_state", "grads", "kv_cache", "inputs", "outputs",
          "saved_activations", "activations"]
  out(f"{unit + ' per device':24s}" + "".join(f"{p:>12s}" for p in PROGRAMS))
  for r in rows:
    if any(target[p].get(r) for p in PROGRAMS):
      out(f"{r:24s}" + "".join(cell(target[p].get(r, 0)) for p in PROGRAMS))
  out(f"{'peak (predicted)':24s}" + "".join(cell(target[p]["peak"]) for p in PROGRAMS))
  largest = {p: max((k for k in target[p] if k != "peak"), key=lambda k: target[p][k]) for p in PROGRAMS}
  out(f"{'largest term':24s}" + "".join(f"{largest[p][:11]:>12s}" for p in PROGRAMS))
  if hbm:
    out(f"{f'fits in {hbm / GiB:.0f} GiB (90%)':24s}" + "".join(
        f"{'yes' if target[p]['peak'] <= 0.9 * hbm else 'NO':>12s}" for p in PROGRAMS))
  result = {"predicted": {p: target[p]["peak"] for p in PROGRAMS},
            "predicted_xla_cpu": {p: cpu[p]["peak"] for p in PROGRAMS}}
  if xla is not None:
    out(f"{'+ XLA:CPU-only copies':24s}" + "".join(cell(cpu[p]["peak"]) for p in PROGRAMS))
    out(f"{'XLA:CPU ' + depth_note:24s}" + "".join(cell(xla[p]["peak"]) for p in PROGRAMS))
    out(f"{'predicted / XLA:CPU':24s}" + "".join(f"{cpu[p]['peak'] / xla[p]['peak']:12.2f}" for p in PROGRAMS))
    out(f"{'compile seconds':24s}" + "".join(f"{seconds[p]:12.1f}" for p in PROGRAMS))
    result["xla_cpu"] = {p: xla[p]["peak"] for p in PROGRAMS}
    result["compile_s"] = {p: round(seconds[p], 2) for p in PROGRAMS}
  return result


def _teacher_name(c) -> str:
  if _TEACHER.value:
    return _TEACHER.value
  names = [t.model_path for t in teachers_lib.all_teachers(teachers_lib.dataset_teachers_from_config(c))]
  return max(names, key=lambda n: model_config(n).num_params) if names else c.model_name


def _reexec_with_devices(n: int) -> None:
  """XLA reads the simulated device count when its CPU client starts: set it and start this command again."""
  flag = f"--xla_force_host_platform_device_count={n}"
  if os.environ.get("_JOPD_PLAN_DEVICES") == str(n):
    return
  env = dict(os.environ, _JOPD_PLAN_DEVICES=str(n), JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                 if not f.startswith("--xla_force_host_platform_device_count")] + [flag]))
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "jopd.plan", *sys.argv[1:]], env)


def main(argv):
  del argv
  c = _CONFIG.value
  sizes = _MESH.value
  n_guess = math.prod(abs(int(s)) for s in sizes.split(",")) if re.fullmatch(r"-?\d+,-?\d+,-?\d+", sizes) else 1
  n, hbm, label = device_kind(_DEVICES.value, n_guess)
  mesh_sizes = parse_mesh(sizes, n if _DEVICES.value else None)
  n = math.prod(mesh_sizes.values())
  depths = [int(x) for x in _LAYERS.value.split(",") if x.strip()]
  if depths:
    _reexec_with_devices(n)
  student_name = _STUDENT.value or c.model_name
  teacher_name = _teacher_name(c)
  student, teacher = model_config(student_name, c.remat), model_config(teacher_name, c.remat)
  w = workload(c, student, teacher, mesh_sizes["data"] * mesh_sizes["fsdp"])
  print(f"jopd.plan: {label}, mesh {mesh_sizes}")
  print(f"student {student_name} ({student.num_params / 1e9:.2f}B, {c.param_dtype}, remat {c.remat}, "
        f"LoRA rank {w.lora.rank}); teacher {teacher_name} ({teacher.num_params / 1e9:.2f}B)")
  print(f"one step: sample {w.sample.batch} rows x ({w.sample.prompt_len} prompt + {w.sample.max_new} new); "
        f"score {w.score.batch} x {w.score.length} (vocab chunk {w.score.chunk}); train {w.train.batch} x "
        f"{w.train.length} in {w.train.num_micro} micro-batch(es)")
  xla = seconds = None
  note = ""
  if depths:
    depths = sorted({min(x, student.num_layers, teacher.num_layers) for x in depths})
    mesh = mesh_lib.make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"])
    xla, seconds = xla_at_depth(w, mesh, depths)
    if len(depths) > 1:
      note = f"{depths[0]},{depths[1]} -> {student.num_layers} L"
    else:
      note = f"at {depths[0]} layers"
      w = w.with_layers(depths[0])
  result = report(w, mesh_sizes, hbm, xla, seconds, note)
  print(json.dumps({"mesh": mesh_sizes, "devices": n, **result}))


if __name__ == "__main__":
  runtime.setup_logging()
  app.run(main)
