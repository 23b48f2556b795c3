"""Tests for jopd/metrics.py: jsonl/TensorBoard writing, resume truncation, process-0 only, W&B wiring,
the progress bar and per-teacher aggregation."""
import glob
import json
import os
import struct
import sys
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jopd import metrics as M


def _step_metrics(step):
  return {"teacher_kl": jnp.float32(1.0 / step), "tokens/generated": np.int64(10 * step), "note": "x"}


def _tb_scalars(log_path):
  """(tag, step, value) of every scalar, and the purge steps, read from the raw event files."""
  from tensorboardX.proto import event_pb2
  scalars, purges = [], []
  for path in sorted(glob.glob(os.path.join(log_path, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log"):
        purges.append(event.step)
      for v in event.summary.value:
        scalars.append((v.tag, event.step, v.simple_value))
  return scalars, purges


def test_writes_jsonl_and_tensorboard(tmp_path):
  config = ml_collections.ConfigDict({"learning_rate": 1e-4, "model": {"name": "tiny"}})
  with M.MetricsWriter(tmp_path, config=config) as w:
    for step in (1, 2):
      w.write(step, _step_metrics(step))
  records = M.read_metrics(tmp_path)
  assert records == [{"step": 1, "note": "x", "teacher_kl": 1.0, "tokens/generated": 10},
                     {"step": 2, "note": "x", "teacher_kl": 0.5, "tokens/generated": 20}]
  assert json.load(open(tmp_path / "config.json")) == {"learning_rate": 1e-4, "model": {"name": "tiny"}}
  scalars, _ = _tb_scalars(str(tmp_path))
  assert ("teacher_kl", 2, 0.5) in scalars and ("tokens/generated", 1, 10.0) in scalars
  assert not any(tag == "note" for tag, _, _ in scalars)  # strings go to jsonl only


def test_resume_equals_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  with M.MetricsWriter(straight) as w:
    for step in range(1, 7):
      w.write(step, _step_metrics(step))
  # A run that logged steps 1..5, checkpointed after step 3, and was killed mid-write of step 6.
  with M.MetricsWriter(resumed) as w:
    for step in range(1, 6):
      w.write(step, _step_metrics(step))
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "teach')
  with M.MetricsWriter(resumed, start_step=4) as w:
    for step in range(4, 7):
      w.write(step, _step_metrics(step))
  assert M.read_metrics(resumed) == M.read_metrics(straight)
  _, purges = _tb_scalars(str(resumed))
  assert 4 in purges  # TensorBoard hides the first run's events of steps >= 4


def test_fresh_start_drops_old_records(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    w.write(1, {"a": 1.0})
  with M.MetricsWriter(tmp_path) as w:  # start_step=0: a run started over from scratch
    w.write(1, {"a": 2.0})
  assert M.read_metrics(tmp_path) == [{"step": 1, "a": 2.0}]


def test_non_primary_writes_nothing(tmp_path):
  w = M.MetricsWriter(tmp_path / "run", config={"a": 1}, is_primary=False, wandb_project="p")
  w.write(1, {"a": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_rejects_non_scalar_metric(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    with pytest.raises(TypeError, match="metric 'kl_bt'.*shape \\(2,\\)"):
      w.write(1, {"kl_bt": np.zeros(2)})


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
  with pytest.raises(ImportError, match="wandb_project='proj' needs the wandb package"):
    M.MetricsWriter(tmp_path, wandb_project="proj")


def test_wandb_logs_and_resumes_same_run(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(("log", step, values))

    def finish(self):
      calls.append(("finish",))

  ids = iter(["id1", "id2"])
  fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: next(ids)),
                               init=lambda **kw: calls.append(("init", kw)) or Run())
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for start in (0, 2):
    with M.MetricsWriter(tmp_path, wandb_project="proj", config={"lr": 1.0}, start_step=start) as w:
      w.write(start + 1, {"teacher_kl": 0.25})
  inits = [c[1] for c in calls if c[0] == "init"]
  assert [i["id"] for i in inits] == ["id1", "id1"]  # the restart continues the same W&B run
  assert inits[0]["project"] == "proj" and inits[0]["config"] == {"lr": 1.0}
  assert ("log", 3, {"teacher_kl": 0.25}) in calls and calls[-1] == ("finish",)


def test_progress_bar_shows_kl_and_throughput():
  bar = M.ProgressBar(total=10, initial=3)
  bar.update(4, {"teacher_kl": jnp.float32(0.125), "throughput/tokens_per_s": 2048.0})
  assert bar._bar.n == 4
  assert "kl=0.125" in bar._bar.postfix and "tok/s=2048" in bar._bar.postfix and "step=4" in bar._bar.postfix
  bar.close()
  M.ProgressBar(total=10, enabled=False).update(1, {"teacher_kl": 1.0})  # non-primary: no bar, no error


def test_teacher_metrics_aggregates_per_teacher():
  out = M.teacher_metrics(["math", "chem", "math"], jnp.array([2.0, 9.0, 4.0]), np.array([4, 3, 2]),
                          all_teachers=["math", "chem", "idle"])
  assert out["teacher_kl"] == pytest.approx(15.0 / 9)
  assert out["teacher_kl/math"] == pytest.approx(6.0 / 6) and out["teacher_kl/chem"] == pytest.approx(3.0)
  assert out["teacher_route/math/scored"] == 2 and out["teacher_route/chem/scored"] == 1
  assert out["teacher_route/math/tokens"] == 6 and out["teacher_route/idle/tokens"] == 0
  assert out["teacher_route/idle/scored"] == 0 and "teacher_kl/idle" not in out
  with pytest.raises(ValueError, match="one of each per row"):
    M.teacher_metrics(["a"], [1.0, 2.0], [1, 1])
