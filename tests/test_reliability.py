"""Reliability of `python -m jopd.train` on tiny models: SIGKILL at random moments of sampling, scoring, update and
checkpoint save resumes exactly; SIGTERM checkpoints the current step and exits 42; a NaN-poisoned batch is skipped
with params bit-identical; repeated non-finite steps stop the run with the last good checkpoint intact.

Faults are injected by running jopd.train through `child()` below, which wraps the loop's stage functions so a
signal lands inside a chosen stage of a chosen step, after a seeded random delay.
"""
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jopd import checkpoint, cli
from jopd import metrics as metrics_lib
from jopd import train
from models import hf
from tests import data_utils, tiny_world

FAULT_ENV = "JOPD_TEST_FAULT"  # 'SIGNAL:STEP:PHASE:DELAY_S', e.g. 'SIGKILL:3:score:0.012'
PHASES = ("sample", "score", "update", "save")
STEPS = 8
# Timings and compile counters legitimately differ between runs; every other metric must match exactly.
_VOLATILE = ("time/", "throughput/", "compile/")
# One compilation cache for every run of this module: only the first run compiles (cached runs start in ~10 s).
_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


# ============================================================================================ fault injection

def child() -> None:
  """`python -c 'from tests.test_reliability import child; child()' --config=... --config.x=y`: jopd.train with
  the fault of $JOPD_TEST_FAULT. The signal is sent by a timer started when the phase of the step begins; the
  phase does not return before the timer fires, so the signal arrives inside that phase (for 'update' the jitted
  step is dispatched and may still be running; for 'save' orbax's background write has started)."""
  from absl import app
  from jopd import runtime, sampler, update

  sig_name, step_s, phase, delay_s = os.environ[FAULT_ENV].split(":")
  sig, target, delay = getattr(signal, sig_name), int(step_s), float(delay_s)
  assert phase in PHASES, phase
  current = {"step": 0}  # the step being computed, 1-based as in metrics and checkpoints

  @contextlib.contextmanager
  def window(name: str, step: int):
    if (name, step) != (phase, target):
      yield
      return
    # Announce before arming: a short delay under load can fire the timer before a later write runs.
    sys.stderr.write(f"fault: {sig_name} in {phase} of step {step} after {delay:.3f}s\n")
    sys.stderr.flush()
    fire = time.monotonic() + delay
    threading.Timer(delay, os.kill, (os.getpid(), sig)).start()
    yield
    # SIGKILL: never leave the phase alive. SIGTERM: let the handler run before the phase returns.
    time.sleep(max(0.0, fire - time.monotonic()) + (30.0 if sig == signal.SIGKILL else 0.05))

  def wrap(module, name: str, phase_name: str, starts_step: bool = False):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
      if starts_step:
        current["step"] += 1
      with window(phase_name, current["step"]):
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

  restore = runtime.restore_or_start

  def restore_and_note_step(*args, **kwargs):
    state, start = restore(*args, **kwargs)
    current["step"] = start
    return state, start

  runtime.restore_or_start = restore_and_note_step
  wrap(sampler, "sample", "sample", starts_step=True)  # eval is off: one sample call per step
  wrap(train, "score_with_teachers", "score")
  wrap(update, "train_step", "update")
  save = checkpoint.Checkpointer.save

  def save_in_window(self, step, *args, **kwargs):
    with window("save", step):
      return save(self, step, *args, **kwargs)

  checkpoint.Checkpointer.save = save_in_window
  app.run(train.main)


def _run(config: str, overrides: dict, fault: str | None = None, check: bool = True):
  if fault is None:
    return tiny_world.run_module("jopd.train", config, overrides, env=_ENV, check=check)
  args = [sys.executable, "-c", "from tests.test_reliability import child; child()",
          f"--config={os.path.join(tiny_world.REPO, config)}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | _ENV | {FAULT_ENV: fault}
  return subprocess.run(args, cwd=tiny_world.REPO, env=env, capture_output=True, text=True, timeout=600)


# ============================================================================================ fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("reliability")
  w = tiny_world.world(root)
  w["cache"] = str(root / "xla_cache")
  return w


def _overrides(world, log_path, **kw):
  return {"model_name": world["student"], "teacher_model": world["teacher"], "dataset": world["data"],
          "log_path": str(log_path), "max_steps": STEPS, "compilation_cache_dir": world["cache"], **kw}


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory):
  """An uninterrupted run that keeps a checkpoint of every step."""
  log = tmp_path_factory.mktemp("baseline")
  _run("configs/tiny_opd.py", _overrides(world, log, save_every=1, max_to_keep=STEPS + 1))
  return log


def _state(log_path, step=None):
  with checkpoint.Checkpointer(os.path.join(str(log_path), "checkpoints"), read_only=True) as ckpt:
    state, _, _ = ckpt.restore(step)
  return jax.tree.map(np.asarray, state)


def _assert_same_state(a, b, what):
  la, ta = jax.tree.flatten_with_path(a)
  lb, tb = jax.tree.flatten_with_path(b)
  assert ta == tb, what
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape, (what, path)
    assert np.array_equal(x, y, equal_nan=True), (what, jax.tree_util.keystr(path))


def _stable(record):
  return {k: v for k, v in record.items() if not k.startswith(_VOLATILE)}


def _steps(log_path):
  return sorted(int(d) for d in os.listdir(os.path.join(str(log_path), "checkpoints")) if d.isdigit())


# ============================================================================================ preemption

def test_sigkill_at_random_moments_of_every_phase_resumes_exactly(world, baseline, tmp_path):
  """Four SIGKILLs (one inside each of sample / score / update / checkpoint save, in a seeded random order, at
  seeded random steps and delays), a restart after each, and the finished run equals the uninterrupted one:
  every metric of every step, and params, optimizer state and RNG bit for bit."""
  rng = random.Random(10)
  phases = list(PHASES)
  rng.shuffle(phases)
  log = tmp_path / "killed"
  overrides = _overrides(world, log, save_every=2)
  for i, phase in enumerate(phases):
    # Kill i lands in steps 2i+1..2i+2, after the restart point (the last even step), so every run progresses;
    # checkpoints are written at even steps only.
    step = 2 * i + 2 if phase == "save" else 2 * i + rng.choice((1, 2))
    fault = f"SIGKILL:{step}:{phase}:{rng.uniform(0.0, 0.03):.3f}"
    proc = _run("configs/tiny_opd.py", overrides, fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
    assert f"fault: SIGKILL in {phase} of step {step}" in proc.stderr
    written = [r["step"] for r in metrics_lib.read_metrics(log)]
    assert written[-1] in (step - 1, step), (fault, written)  # the killed step itself may have been logged
    saved = _steps(log)
    assert all(s % 2 == 0 and s <= step for s in saved), (fault, saved)  # no torn save counted as a checkpoint
  _run("configs/tiny_opd.py", overrides)

  full, resumed = metrics_lib.read_metrics(baseline), metrics_lib.read_metrics(log)
  assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
  for a, b in zip(full, resumed):
    assert _stable(a) == _stable(b), a["step"]
  _assert_same_state(_state(baseline, STEPS), _state(log, STEPS), "final state")


def test_sigterm_checkpoints_the_current_step_and_exits_42(world, baseline, tmp_path):
  """SIGTERM inside step 3 (a random phase; periodic saves are at even steps only): the loop finishes the step,
  writes checkpoint 3, equal to the uninterrupted run's step 3, and exits with PREEMPTED_EXIT_CODE."""
  rng = random.Random(11)
  phase = rng.choice(("sample", "score", "update"))
  log = tmp_path / "preempted"
  proc = _run("configs/tiny_opd.py", _overrides(world, log, save_every=2),
              f"SIGTERM:3:{phase}:{rng.uniform(0.0, 0.03):.3f}")
  assert train.PREEMPTED_EXIT_CODE == 42
  assert proc.returncode == 42, proc.stderr[-3000:]
  assert "preempted: checkpoint at step 3 written; exiting with 42" in proc.stderr
  assert [r["step"] for r in metrics_lib.read_metrics(log)] == [1, 2, 3]
  assert _steps(log) == [2, 3]
  _assert_same_state(_state(baseline, 3), _state(log, 3), "checkpoint of the preempted step")


# ============================================================================================ non-finite guard

def _poisoned_teacher(world, path):
  """The teacher with every weight NaN: each completion it scores gets NaN logprobs, hence NaN advantages."""
  nan = jax.tree.map(lambda x: x * np.float32(np.nan), _load_params(world["teacher"]))
  directory, _, _ = tiny_world.make_model(path, world["tokenizer"], seed=0, params=nan)
  return directory


def _load_params(directory):
  return hf.load_pretrained(directory, dtype=np.float32)[1]


def _routed_config(path, teachers, **fields) -> str:
  body = "".join(f"  c.{k} = {v!r}\n" for k, v in {"teachers": teachers, "teacher_model": "", **fields}.items())
  path.write_text("from configs import tiny_opd\n\ndef get_config():\n  c = tiny_opd.get_config()\n" + body +
                  "  return c\n")
  return str(path)


def test_poisoned_rows_skip_their_step_with_params_bit_identical(world, tmp_path):
  """Rows routed to a NaN teacher poison the steps that draw them: those steps apply no update (params and
  optimizer state bit-identical to the step before), count train/skipped_nonfinite and log the rows' file:line;
  the other steps train normally."""
  poison = _poisoned_teacher(world, tmp_path / "poison")
  rows = [data_utils.prompt_row(f"What is {i} + {i + 1}?", teacher="poison" if i in (2, 5) else "good")
          for i in range(8)]
  data = data_utils.write_jsonl(tmp_path / "rows.jsonl", rows)
  teachers = [{"name": "good", "model_path": world["teacher"], "route_value": "good"},
              {"name": "poison", "model_path": poison, "route_value": "poison"}]
  config = _routed_config(tmp_path / "routed.py", teachers, max_consecutive_nonfinite=STEPS)
  log = tmp_path / "run"
  proc = _run(config, {"model_name": world["student"], "dataset": data, "log_path": str(log), "max_steps": 6,
                       "save_every": 1, "max_to_keep": 10, "compilation_cache_dir": world["cache"]})
  records = metrics_lib.read_metrics(log)
  poisoned = [r["step"] for r in records if r.get("teacher_route/poison/scored", 0) > 0]
  skipped = [r["step"] for r in records if r["train/skipped_nonfinite"]]
  assert poisoned and len(poisoned) < len(records), poisoned  # the seeded order gives both kinds of step
  assert skipped == poisoned and all(r["train/skipped_nonfinite"] == 1.0 for r in records if r["step"] in skipped)
  for r in records:
    assert np.isfinite(r["loss"]) == (r["step"] not in poisoned), r
  warnings = [line for line in proc.stderr.splitlines() if "update skipped" in line]
  assert len(warnings) == len(poisoned)
  for line in warnings:
    assert f"{data}:3" in line or f"{data}:6" in line, line  # the poisoned rows' file:line
  for step in range(2, 7):
    before, after = _state(log, step - 1), _state(log, step)
    if step in poisoned:
      _assert_same_state(before["trainable"], after["trainable"], f"params across skipped step {step}")
      _assert_same_state(before["opt_state"], after["opt_state"], f"optimizer state across skipped step {step}")
    else:
      assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["trainable"]),
                                                           jax.tree.leaves(after["trainable"]))), step


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_checkpoint_intact(world, baseline,
                                                                                      tmp_path):
  """A run resumed from a good checkpoint (the baseline's step 2) whose only teacher is NaN: with
  max_consecutive_nonfinite=1, step 3 is skipped, step 4 stops the run with the documented FloatingPointError,
  and the latest checkpoint holds step 2's params bit for bit."""
  log = tmp_path / "nonfinite"
  os.makedirs(log / "checkpoints")
  shutil.copytree(os.path.join(baseline, "checkpoints", "2"), log / "checkpoints" / "2")
  poison = _poisoned_teacher(world, tmp_path / "poison")
  proc = _run("configs/tiny_opd.py", _overrides(world, log, teacher_model=poison, save_every=1,
                                                max_consecutive_nonfinite=1), check=False)
  assert proc.returncode == cli.NONFINITE_EXIT_CODE == 3, proc.stderr[-3000:]
  assert ("2 consecutive steps with a non-finite loss or gradient (max_consecutive_nonfinite=1); stopping with "
          f"the last good checkpoint intact in {log}/checkpoints") in proc.stderr, proc.stderr[-3000:]
  assert "jax/_src" not in proc.stderr[proc.stderr.rfind("Traceback"):]  # raised by the host loop, not in a jit
  records = metrics_lib.read_metrics(log)
  assert [(r["step"], r["train/skipped_nonfinite"]) for r in records] == [(3, 1.0)]  # step 4 raised before logging
  # Checkpoint 3's background write may still be running when step 4 raises; it then stays a temporary
  # directory that is never counted (train.py does not wait for it on an exception: see docs/errors.md).
  assert _steps(log) in ([2], [2, 3])
  good = _state(baseline, 2)
  _assert_same_state(good, _state(log, 2), "last good checkpoint")
  _assert_same_state(good["trainable"], _state(log)["trainable"], "latest checkpoint")
