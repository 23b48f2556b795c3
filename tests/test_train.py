"""jopd/train.py end to end on tiny models: outputs, exact resume after SIGKILL, learning signal, routing,
multi-dataset batches, tokenizer refusal and counted bad rows."""
import json
import os

import jax
import numpy as np
import pytest

from jopd import metrics as metrics_lib
from jopd import scoring, train
from jopd.data import pipeline as data_pipeline
from jopd.data import builders
from jopd.data.rows import SkipCounter
from tests import data_utils, tiny_world

DESIGN_METRICS = ["step", "teacher_kl", "sampler_trainer_kl", "entropy", "tokens/generated", "frac_truncated",
                  "time/sample", "time/score", "time/train", "time/step", "throughput/tokens_per_s"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.world(tmp_path_factory.mktemp("world"))


def _base(world, log_path, **kw):
  return {"model_name": world["student"], "teacher_model": world["teacher"], "dataset": world["data"],
          "log_path": str(log_path), **kw}


def test_resume_after_sigkill_equals_uninterrupted_run(world, tmp_path):
  full = tmp_path / "full"
  tiny_world.run_module("jopd.train", "configs/tiny_opd.py", _base(world, full, max_steps=6))
  records = metrics_lib.read_metrics(full / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for name in DESIGN_METRICS + ["teacher_kl/teacher", "teacher_route/teacher/scored"]:
    assert name in records[0], name
  assert records[0]["teacher_route/teacher/scored"] == 4  # groups_per_batch 2 x group_size 2
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))
  assert sorted(os.listdir(full / "checkpoints")) == ["3", "6"]

  killed = tmp_path / "killed"
  proc = tiny_world.run_module("jopd.train", "configs/tiny_opd.py", _base(world, killed, max_steps=6),
                               env={"JOPD_TEST_KILL_AFTER_STEP": "4"}, check=False)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert [r["step"] for r in metrics_lib.read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]
  tiny_world.run_module("jopd.train", "configs/tiny_opd.py", _base(world, killed, max_steps=6))

  resumed = metrics_lib.read_metrics(killed / "metrics.jsonl")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(records, resumed):
    for k in ("teacher_kl", "loss", "grad_norm", "tokens/generated", "entropy"):
      assert a[k] == b[k], (a["step"], k)
  jax.tree.map(np.testing.assert_array_equal, tiny_world.final_trainable(full), tiny_world.final_trainable(killed))


def test_teacher_kl_decreases_toward_a_perturbed_student(world, tmp_path):
  log = tmp_path / "learn"
  tiny_world.run_module("jopd.train", "configs/tiny_opd.py", _base(
      world, log, max_steps=20, save_every=0, learning_rate=1e-2, groups_per_batch=4, group_size=4,
      max_tokens=8, lora_rank=0))
  kl = [r["teacher_kl"] for r in metrics_lib.read_metrics(log / "metrics.jsonl")]
  first, last = np.mean(kl[:5]), np.mean(kl[-5:])
  # Margin: the last five steps' mean KL is at least 15% below the first five's (measured: 24%).
  assert last < 0.85 * first, kl


def _routed_world(world, tmp_path):
  """Two teachers on different weights; rows routed by 'teacher', some with a privileged teacher prompt, and a
  few bad rows."""
  tok = world["tokenizer"]
  student, _, params = tiny_world.make_model(tmp_path / "s", tok, seed=0)
  t_a, _, _ = tiny_world.make_model(tmp_path / "ta", tok, seed=0, params=tiny_world.perturbed(params, 5, 0.3))
  t_b, _, _ = tiny_world.make_model(tmp_path / "tb", tok, seed=0, params=tiny_world.perturbed(params, 6, 0.3))
  rows = []
  for i in range(8):
    route = "alpha" if i % 2 else "beta"
    extra = {"teacher_messages": [data_utils.user(f"What is {i} + 1? The answer is {i + 1}.")]} if i % 4 == 0 else {}
    rows.append(data_utils.prompt_row(f"What is {i} + 1?", teacher=route, **extra))
  rows += [data_utils.prompt_row("no route"), data_utils.prompt_row("x", teacher="gamma"),
           data_utils.prompt_row("y", teacher=3), "{not json", {"messages": [{"role": "robot", "content": "z"}]}]
  data = data_utils.write_jsonl(tmp_path / "routed.jsonl", rows)
  teachers = [{"name": "alpha", "model_path": t_a, "route_value": "alpha"},
              {"name": "beta", "model_path": t_b, "route_value": "beta"}]
  return student, teachers, data


def _write_config(path, body: str) -> str:
  path.write_text("from jopd import config\n\ndef get_config():\n  c = config.opd()\n"
                  "  c.param_dtype = 'float32'\n  c.remat = 'none'\n  c.lora_rank = 4\n  c.max_tokens = 6\n"
                  "  c.max_steps = 2\n  c.save_every = 0\n  c.eval_every = 0\n  c.teacher_model = ''\n"
                  + "".join(f"  {line}\n" for line in body.splitlines()) + "  return c\n")
  return str(path)


def test_routed_run_scores_each_row_with_its_teacher_and_counts_bad_rows(world, tmp_path):
  student, teachers, data = _routed_world(world, tmp_path)
  cfg = _write_config(tmp_path / "routed_cfg.py", f"c.teachers = {teachers!r}\nc.groups_per_batch = 4\n"
                      "c.group_size = 1")
  log = tmp_path / "routed_run"
  tiny_world.run_module("jopd.train", cfg, {"model_name": student, "dataset": data, "log_path": str(log)})
  records = metrics_lib.read_metrics(log / "metrics.jsonl")
  scored = sum(r["teacher_route/alpha/scored"] + r["teacher_route/beta/scored"] for r in records)
  assert scored == 8 and all("teacher_kl/alpha" in r or "teacher_kl/beta" in r for r in records)
  last = records[-1]
  assert last["data/skipped/missing_route"] == 1
  assert last["data/skipped/unknown_route"] == 1
  assert last["data/skipped/route_not_string"] == 1
  assert last["data/skipped/bad_json"] == 1
  assert last["data/skipped/bad_role"] == 1


def test_privileged_context_scoring_matches_direct_token_logprobs(world, tmp_path):
  from jopd import runtime, config as config_lib, mesh as mesh_lib
  student_dir, teachers_raw, data = _routed_world(world, tmp_path)
  c = config_lib.opd()
  c.param_dtype, c.remat, c.teachers, c.dataset, c.teacher_model = "float32", "none", teachers_raw, data, ""
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  student = runtime.load_model(student_dir, c, mesh)
  specs = train.teachers_lib.dataset_teachers_from_config(c)
  teachers = train.load_teachers(c, specs, student, mesh)
  counter = SkipCounter()
  contexts = {n: data_pipeline.TeacherContext(t.model.tokenizer) for n, t in teachers.items()}
  examples = data_pipeline.prepare_examples(
      builders.read_records(data), tokenizer=student.tokenizer, counter=counter,
      route=lambda row: specs[0].teacher_for(row).name, teacher_contexts=contexts)
  assert len(examples) == 8 and counter.total == 5
  completion = np.array(student.tokenizer.encode("The answer is 1."), np.int32)
  scores = train.score_with_teachers(examples, [completion] * 8, teachers, None)
  for ex, got in zip(examples, scores):
    t = teachers[ex["teacher"]]
    privileged = "teacher_messages" in ex["row"] and ex["row"]["teacher_messages"]
    same = len(ex["teacher_ids"]) == len(ex["prompt_ids"]) and np.array_equal(ex["teacher_ids"], ex["prompt_ids"])
    assert same != bool(privileged)
    want = scoring.token_logprobs(t.model.cfg, t.params, [ex["teacher_ids"]], [completion])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = scoring.token_logprobs(t.model.cfg, t.params, [ex["prompt_ids"]], [completion])[0]
    if privileged:  # the privileged prompt really changes what the teacher says about the same tokens
      assert np.abs(plain - got).max() > 1e-3
    other = teachers["alpha" if ex["teacher"] == "beta" else "beta"]
    wrong = scoring.token_logprobs(other.model.cfg, other.params, [ex["teacher_ids"]], [completion])[0]
    assert np.abs(wrong - got).max() > 1e-3  # scored by its own teacher, not the other one


def test_multi_dataset_batches_take_groups_per_batch_from_each(world, tmp_path):
  other = tiny_world.prompts_jsonl(tmp_path / "other.jsonl", n=6)
  datasets = [{"dataset": world["data"], "groups_per_batch": 2, "teacher": {"name": "t1", "model_path": world["teacher"]}},
              {"dataset": other, "groups_per_batch": 3, "teacher": {"name": "t2", "model_path": world["student"]}}]
  cfg = _write_config(tmp_path / "multi_cfg.py", f"c.datasets = {datasets!r}\nc.dataset = ''\nc.group_size = 2")
  log = tmp_path / "multi_run"
  tiny_world.run_module("jopd.train", cfg, {"model_name": world["student"], "log_path": str(log)})
  records = metrics_lib.read_metrics(log / "metrics.jsonl")
  for r in records:
    assert (r["teacher_route/t1/scored"], r["teacher_route/t2/scored"]) == (4, 6)
  # Before any update t2 is the student itself: sampler and teacher agree token for token.
  assert records[0]["teacher_kl/t2"] == pytest.approx(0.0, abs=1e-4)
  assert records[0]["teacher_kl/t1"] > 0.1


def test_tokenizer_mismatch_is_refused_at_startup(world, tmp_path):
  other_tok = data_utils.tokenizer_lib.train_tokenizer(["completely different text " * 5, "zebra quartz"] * 3,
                                                       vocab_size=len(world["tokenizer"]))
  teacher, _, _ = tiny_world.make_model(tmp_path / "bad_teacher", other_tok, seed=1)
  proc = tiny_world.run_module("jopd.train", "configs/tiny_opd.py",
                               _base(world, tmp_path / "mismatch", teacher_model=teacher), check=False)
  assert proc.returncode != 0
  assert "its tokenizer is incompatible with the student's" in proc.stderr
  assert "id " in proc.stderr.split("incompatible")[1][:2000]
  assert not os.path.exists(tmp_path / "mismatch" / "metrics.jsonl")


def test_standalone_eval_grades_rows_and_measures_teacher_kl(world, tmp_path):
  rows = [data_utils.prompt_row(f"What is {i} + {i}?", expected_answer=str(2 * i)) for i in range(3)]
  rows.append(data_utils.prompt_row("no answer to grade"))
  data = data_utils.write_jsonl(tmp_path / "eval.jsonl", rows)
  proc = tiny_world.run_module("jopd.eval", "configs/tiny_opd.py", {
      "model_name": world["student"], "teacher_model": world["student"], "dataset": data, "eval_dataset": data})
  out = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert out["eval/rows"] == 3 and out["eval/skipped/no_expected_answer"] == 1 and out["eval/samples"] == 3
  assert 0.0 <= out["eval/accuracy"] <= 1.0
  assert out["eval/teacher_kl"] == pytest.approx(0.0, abs=1e-4)  # the teacher is the student: greedy KL is 0
  proc = tiny_world.run_module("jopd.eval", "configs/tiny_opd.py", {
      "model_name": world["student"], "teacher_model": world["teacher"], "dataset": data, "eval_dataset": data})
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["eval/teacher_kl"] > 0.1
