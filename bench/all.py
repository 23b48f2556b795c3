"""Every bench (`make bench` = `python -m bench.all`): peak, small-row dot kernels, sample, score, train step, each
in its own process, then predicted vs XLA memory of the four programs on the bench model. stdout: one JSON line
per result (bench, ratio, target, unit, raw numbers); everything else the benches print goes to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

BENCHES = ("peak", "gemv", "sample", "score", "train_step", "memory")


def _run_module(name: str, extra: list[str]) -> int:
  """Runs `python -m bench.<name>`; JSON lines to stdout, the rest to stderr. Returns the exit status."""
  proc = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *extra], stdout=subprocess.PIPE, text=True)
  for line in proc.stdout:
    is_json = line.startswith("{")
    (sys.stdout if is_json else sys.stderr).write(line)
    (sys.stdout if is_json else sys.stderr).flush()
  return proc.wait()


def memory_bench() -> None:
  """jopd.memory's prediction vs XLA's memory analysis of prefill, decode, score and train step (remat 'full', the
  configs' default) with the bench shapes, on one device, at the bench model's full depth."""
  import jax
  import jax.numpy as jnp

  from bench import common
  from jopd import config as config_lib, memory, plan, scoring, update
  from jopd import mesh as mesh_lib
  from models import lora, qwen3

  cfg = qwen3.Qwen3Config.from_hf(dict(common.BENCH_MODEL, model_type="qwen3"))
  cfg = dataclasses.replace(cfg, remat="full")
  w = plan.Workload(cfg, cfg, lora.LoraConfig(rank=32), jnp.bfloat16, memory.SampleShape(16, 64, 256),
                    memory.ScoreShape(16, 512, scoring.auto_chunk_size(16, cfg.vocab_size, 512)),
                    memory.TrainShape(16, 512), update.make_optimizer(config_lib.opd(), 10))
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  unrolled = jax.devices()[0].platform == "cpu"   # what jopd.sampler.sample runs on this platform
  measured = plan.compile_all(w, mesh, unrolled=unrolled)
  predicted = plan.predict(w, None, cpu=jax.devices()[0].platform == "cpu", unrolled=unrolled)
  for name in plan.PROGRAMS:
    m, p = measured[name], predicted[name]
    common.emit(f"memory_{name}_bf16", p["peak"] / m["peak"], 1.0, "predicted / XLA peak bytes (0.8-1.2)",
                predicted_mib=p["peak"] / 2**20, measured_mib=m["peak"] / 2**20,
                measured={k: v for k, v in m.items() if k != "compile_s"}, predicted=p,
                compile_s=m["compile_s"])


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
  ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not numbers to quote)")
  args = ap.parse_args()
  failed = []
  for name in args.only.split(","):
    t = time.perf_counter()
    print(f"# bench.{name}", file=sys.stderr, flush=True)
    if name == "memory":
      memory_bench()
      status = 0
    else:
      quick = {"peak": ["--quick"], "gemv": ["--repeats=1"],
               "train_step": ["--steps=1", "--torch_steps=1", "--remats=full"]}
      extra = quick.get(name, []) if args.quick else []
      status = _run_module(name, extra)
    print(f"# bench.{name}: exit {status} after {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    if status:
      failed.append(name)
      print(json.dumps({"bench": name, "ratio": None, "target": None, "unit": "failed", "exit": status}),
            flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
