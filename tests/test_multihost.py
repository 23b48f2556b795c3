"""Multi-process `python -m jopd.train` on one machine: 2 and 4 CPU processes (2 simulated devices each) joined
over 127.0.0.1 match one process holding the same global mesh; a killed process ends the run with a clear
error within a bounded time, and restarting every process resumes from the last checkpoint."""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jopd import checkpoint
from jopd import metrics as metrics_lib
from jopd import runtime, train
from jopd.data import pipeline as data_pipeline
from tests import tiny_world

# Cheap XLA CPU compiles (the runs are compile-bound); every run of a comparison uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# groups_per_batch must split evenly over 4 processes; checkpoints at steps 2 and 3.
RUN = {"groups_per_batch": 4, "max_steps": 3, "save_every": 2}
EXACT = ["step", "tokens/generated", "teacher_route/teacher/scored", "frac_truncated"]
# fp32 results of differently partitioned programs (gloo collectives vs in-process ones) differ in summation
# order only. Metrics: relative tolerance 1e-5 (measured <= 3e-7). Weights and Adam moments after 3 steps: each
# tensor's largest difference within 1e-4 of its largest magnitude (measured <= 1.5e-5); elementwise relative
# differences of near-zero elements are larger, since Adam divides by sqrt(nu).
CLOSE = ["teacher_kl", "loss", "grad_norm", "entropy"]
METRIC_RTOL = 1e-5
STATE_TOL = 1e-4


def assert_close_trees(got, want):
  def close(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= STATE_TOL * np.abs(b).max(), (
        f"{jax.tree_util.keystr(path)}: max difference {np.abs(a - b).max():.3g}, largest value "
        f"{np.abs(b).max():.3g}")
  jax.tree_util.tree_map_with_path(close, got, want)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.world(tmp_path_factory.mktemp("world"))


def _overrides(world, log_path, **kw):
  return {"model_name": world["student"], "teacher_model": world["teacher"], "dataset": world["data"],
          "log_path": str(log_path), **RUN, **kw}


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JOPD_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache every program: restarts must compile none
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(overrides: dict, env: dict, log: str) -> subprocess.Popen:
  args = [sys.executable, "-m", "jopd.train", f"--config={os.path.join(tiny_world.REPO, 'configs/tiny_opd.py')}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  with open(log, "w") as out:
    return subprocess.Popen(args, cwd=tiny_world.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def single_process(devices: int, overrides: dict) -> subprocess.Popen:
  """One process on `devices` devices; output in <log_path>.p0.log. Started beside a multi-process run, it
  uses the CPU time that run's processes spend waiting for each other."""
  return _start(overrides, _env(devices), f"{overrides['log_path']}.p0.log")


def launch(processes: int, overrides: dict, process_env=None) -> list[subprocess.Popen]:
  """`processes` jopd.train processes of one cluster, 2 devices each; output in <log_path>.p<i>.log."""
  port = _free_port()
  return [_start(overrides, _env(2, JOPD_COORDINATOR=f"127.0.0.1:{port}", JOPD_NUM_PROCESSES=str(processes),
                                 JOPD_PROCESS_ID=str(i), **(process_env or {}).get(i, {})),
                 f"{overrides['log_path']}.p{i}.log")
          for i in range(processes)]


def output(overrides: dict, i: int) -> str:
  with open(f"{overrides['log_path']}.p{i}.log") as f:
    return f.read()


def wait_all(procs, overrides, timeout=300) -> None:
  deadline = time.monotonic() + timeout
  for i, p in enumerate(procs):
    try:
      p.wait(max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"process {i} still running after {timeout}s:\n{output(overrides, i)[-3000:]}")
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{output(overrides, i)[-6000:]}"


def assert_same_run(got_dir, want_dir, steps):
  got, want = metrics_lib.read_metrics(got_dir), metrics_lib.read_metrics(want_dir)
  assert [r["step"] for r in got] == [r["step"] for r in want] == steps
  for g, w in zip(got, want):
    for k in EXACT:
      assert g[k] == w[k], (g["step"], k, g[k], w[k])
    for k in CLOSE:
      np.testing.assert_allclose(g[k], w[k], rtol=METRIC_RTOL, err_msg=f"step {g['step']} {k}")
  assert_close_trees(tiny_world.final_trainable(got_dir), tiny_world.final_trainable(want_dir))


def assert_only_process_0_wrote(log_dir, steps, launches=1):
  # More writers would duplicate every line and leave one TensorBoard event file per process and launch.
  assert [r["step"] for r in metrics_lib.read_metrics(log_dir)] == steps
  assert len([f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]) == launches


def test_interleaved_process_shards_are_the_single_process_batches():
  """gather_examples' order: per-process batches interleaved = one process's batches, across epochs and with
  several datasets of different batch sizes; a wrong order would change which prompt each sampled row gets."""
  def pipeline(name, rows, batch, seed, process_index, count):
    return data_pipeline.Pipeline([{"id": i, "dataset": name} for i in range(rows)], seed=seed, name=name,
                                  groups_per_batch=batch // count, process_index=process_index, process_count=count)

  def pipelines(process_index, count):
    single = pipeline("a", 8, 4, 3, process_index, count)
    multi = data_pipeline.MultiPipeline({"a": pipeline("a", 8, 4, 3, process_index, count),
                                         "b": pipeline("b", 12, 8, 4, process_index, count)})
    return single, multi

  for count in (2, 4):
    single, single_multi = pipelines(0, 1)
    shards = [pipelines(p, count) for p in range(count)]
    for _ in range(5):  # 2 batches per epoch of "a": crosses epochs
      assert train.interleave([next(a) for a, _ in shards]) == next(single)
      assert train.interleave([next(m) for _, m in shards]) == next(single_multi)


# A survivor sees the dead peer's sockets close in its next collective (every step gathers the prompts) and
# exits at once; the bound allows for the slowest path, jax.distributed's 100 s heartbeat timeout.
EXIT_BOUND_S = 120


@pytest.fixture(scope="module")
def two_process_run(world, tmp_path_factory):
  """A 1-process run on 4 devices, and a 2-process run (same global mesh: data=1, fsdp=4, tensor=1) whose
  process 1 is SIGKILLed once the step-2 checkpoint is written, then restarted: one run serves both acceptance
  tests, since the restarted run must still match the single-process one."""
  root = tmp_path_factory.mktemp("two")
  single = _overrides(world, root / "single")
  reference = single_process(4, single)
  multi = _overrides(world, root / "multi")
  procs = launch(2, multi, process_env={1: {"JOPD_TEST_KILL_AFTER_STEP": "2"}})
  try:
    procs[1].wait(300)
    killed_at = time.monotonic()
    try:
      procs[0].wait(EXIT_BOUND_S)
      exit_s = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process 0 still running {EXIT_BOUND_S}s after process 1 died:\n"
                           f"{output(multi, 0)[-3000:]}") from None
  finally:
    for p in procs:
      p.kill()
  with checkpoint.Checkpointer(os.path.join(multi["log_path"], "checkpoints"), read_only=True) as ckpt:
    latest = ckpt.latest_step()
  killed = {"exit_s": exit_s, "returncodes": [p.returncode for p in procs],
            "log0": output(multi, 0), "log1": output(multi, 1), "latest": latest}
  wait_all(launch(2, multi), multi)
  wait_all([reference], single)
  return multi, single, killed


def test_two_processes_match_one_process_and_restore_in_one(two_process_run):
  multi, single, _ = two_process_run
  assert_same_run(multi["log_path"], single["log_path"], [1, 2, 3])
  assert_only_process_0_wrote(multi["log_path"], [1, 2, 3], launches=2)  # killed, then restarted
  assert "process 1 of 2" in output(multi, 1)

  # The multi-process checkpoint restores in this single process (8 devices), optimizer state included, and
  # keeps each process's data position.
  with checkpoint.Checkpointer(os.path.join(multi["log_path"], "checkpoints"), read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    state, data_state, meta = ckpt.restore()
  with checkpoint.Checkpointer(os.path.join(single["log_path"], "checkpoints"), read_only=True) as ckpt:
    want, _, _ = ckpt.restore()
  assert_close_trees(state, want)
  assert data_state["process_count"] == 2
  assert [s["process_index"] for s in data_state["processes"]] == [0, 1]
  assert meta["lora_rank"] == 4


def test_killed_process_ends_the_run_and_a_restart_resumes(two_process_run):
  multi, _, killed = two_process_run
  assert killed["returncodes"][1] == -9, killed["log1"][-3000:]
  assert killed["returncodes"][0] == runtime.PEER_LOST_EXIT_CODE, killed["log0"][-3000:]
  assert "lost contact with another process of this run" in killed["log0"]
  print(f"survivor exited {killed['exit_s']:.1f}s after its peer was killed")
  assert killed["latest"] == 2
  restarted = output(multi, 0)
  assert "resumed from checkpoint at step 2" in restarted
  # Process 0 wrote the persistent compilation cache before the kill, so the restart compiles nothing (on CPU
  # the other processes recompile: their cache keys carry their own local devices, and only process 0 writes).
  first = restarted.split("compilation cache after first step (3): ")[1].splitlines()[0]
  assert first.endswith(", 0 compiled"), first


def test_four_processes_match_one_process(world, tmp_path):
  """Four processes of 2 devices against one process of 8, 3 steps each (the cost is compiling in four processes,
  not the steps)."""
  single = _overrides(world, tmp_path / "single", max_steps=3)
  reference = single_process(8, single)
  multi = _overrides(world, tmp_path / "multi", max_steps=3)
  wait_all(launch(4, multi), multi)
  wait_all([reference], single)
  assert_same_run(multi["log_path"], single["log_path"], [1, 2, 3])
  assert_only_process_0_wrote(multi["log_path"], [1, 2, 3])
