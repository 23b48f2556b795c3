"""jopd.memory's prediction vs XLA's memory analysis over the calibration grid of docs/memory.md: the bench
model's widths at 3 and 12 layers, batch x length 16 x 512, 8 x 1024, 4 x 256, every remat policy; compiled on one
CPU device, never run. `python -m bench.memory_fit [--programs=train_step,prefill,decode,score] [--remats=...]`.
stdout: one JSON line per point (ratio = predicted / XLA peak; docs/memory.md's band is 0.8-1.2).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from bench import common
from jopd import config as config_lib, memory, plan, scoring, update
from jopd import mesh as mesh_lib
from models import lora, qwen3

GRID = ((12, 16, 512), (3, 16, 512), (3, 8, 1024), (3, 4, 256), (12, 4, 256))   # layers, batch, length


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--programs", default=",".join(plan.PROGRAMS))
  ap.add_argument("--remats", default="full,dots,none")
  args = ap.parse_args()
  programs = args.programs.split(",")
  base = qwen3.Qwen3Config.from_hf(dict(common.BENCH_MODEL, model_type="qwen3"))
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  for remat in args.remats.split(","):
    for layers, batch, length in GRID:
      cfg = dataclasses.replace(base, remat=remat, num_layers=layers)
      w = plan.Workload(cfg, cfg, lora.LoraConfig(rank=32), jnp.bfloat16, memory.SampleShape(batch, 64, 256),
                        memory.ScoreShape(batch, length, scoring.auto_chunk_size(batch, cfg.vocab_size, length)),
                        memory.TrainShape(batch, length), update.make_optimizer(config_lib.opd(), 10))
      predicted = plan.predict(w, None, cpu=True, unrolled=True)
      lowered = {}
      if "prefill" in programs or "decode" in programs:
        lowered["prefill"], lowered["decode"] = plan.lower_sample(w, mesh, unrolled=True)
      if "score" in programs:
        lowered["score"] = plan.lower_score(w, mesh)
      if "train_step" in programs:
        lowered["train_step"] = plan.lower_train(w, mesh)
      for name in programs:
        if remat != "full" and name != "train_step":
          continue            # only the update depends on the remat policy
        m, p = memory.measured(lowered[name].compile()), predicted[name]
        common.emit(f"memory_fit_{name}_remat_{remat}_L{layers}_b{batch}_t{length}", p["peak"] / m["peak"], 1.0,
                    "predicted / XLA peak bytes (0.8-1.2)", predicted_mib=p["peak"] / 2**20,
                    measured_mib=m["peak"] / 2**20)


if __name__ == "__main__":
  main()
