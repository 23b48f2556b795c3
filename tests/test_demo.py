"""jopd/demo.py and jopd/demo_task.py: the synthetic tasks are checkable and split cleanly, and `python -m jopd.demo
--quick` runs every stage through the real entry points, improves the student by OPD and reuses finished stages."""
import json
import os
import subprocess
import sys

import pytest

from jopd import demo, demo_task
from jopd import eval as eval_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("teacher_add", "teacher_word", "student_sft", "opd", "sft_traces", "routed")


@pytest.mark.parametrize("kind", demo_task.KINDS)
def test_reference_solutions_grade_correct_and_splits_are_disjoint(kind):
  train = demo_task.problems(kind, 500, seed=0, split="train")
  held = demo_task.problems(kind, 100, seed=0, split="eval")
  assert demo_task.problems(kind, 500, seed=0, split="train") == train  # a re-run sees the same data
  for p in train + held:
    assert eval_lib.grade(p["solution"], p["answer"]), p
    assert not eval_lib.grade(p["solution"], str(int(p["answer"]) + 1)), p
  numbers = lambda ps: {tuple(int(t) for t in p["question"].replace("?", " ").replace(".", " ").split() if t.isdigit())
                        for p in ps}
  # Held out by the numbers, so no wording of an evaluated problem is trained on.
  assert not numbers(train) & numbers(held)
  assert len({p["question"] for p in train}) == len(train)


def test_add_solution_writes_every_column_and_carry():
  p = demo_task.problems("add", 200, seed=3, split="train")
  carried = next(x for x in p if "+1=" in x["solution"])
  a, b = (int(t) for t in carried["question"][len("What is "):-1].split(" + "))
  assert carried["answer"] == str(a + b)
  assert carried["solution"].count("\n") == 2  # two columns, then the Final line


def test_unknown_kind_and_split_are_refused():
  with pytest.raises(ValueError, match="kind='mul'"):
    demo_task.problems("mul", 1, seed=0, split="train")
  with pytest.raises(ValueError, match="split='test'"):
    demo_task.problems("add", 1, seed=0, split="test")


def test_cached_accuracy_is_recomputed_after_its_stage_is_re_run(tmp_path, monkeypatch):
  paths = demo_task.layout(str(tmp_path))
  os.makedirs(tmp_path / "data")
  held = demo_task.problems("add", 4, seed=0, split="eval")
  demo_task.write_jsonl(paths["add_eval"], [demo_task.prompt_row(p) for p in held])
  answers = {"text": [p["solution"] for p in held]}  # every answer right, then half of them wrong
  monkeypatch.setattr(demo.Evaluator, "load", lambda self, model, ckpt: None)
  monkeypatch.setattr(demo.Evaluator, "generate", lambda self, policy, convs, desc: [(t, 1) for t in answers["text"]])
  ckpt = tmp_path / "opd" / "checkpoints"
  (ckpt / "20").mkdir(parents=True)
  assert demo.Evaluator(paths, demo.QUICK).accuracy("opd", "model", str(ckpt), ("add",)) == {"add": 1.0}
  answers["text"] = [p["solution"] if i % 2 else "Final answer: -1" for i, p in enumerate(held)]
  # Same checkpoint, a new process: the cached figure (the model is not evaluated again).
  assert demo.Evaluator(paths, demo.QUICK).accuracy("opd", "model", str(ckpt), ("add",)) == {"add": 1.0}
  (ckpt / "20").rmdir()
  (ckpt / "40").mkdir()  # the stage was deleted and re-run for longer
  assert demo.Evaluator(paths, demo.QUICK).accuracy("opd", "model", str(ckpt), ("add",)) == {"add": 0.5}


def test_teacher_traces_are_reused_only_for_the_token_count_they_were_written_for():
  rows = [{"extra_info": {"tokens": n}} for n in (5, 5, 5, 5, 5, 5)]
  assert demo._traces_end(rows, 10, 2) == 2     # two rows hold 10 tokens: one whole batch
  assert demo._traces_end(rows, 11, 2) == 4     # rounded up to whole batches
  assert demo._traces_end(rows, 30, 3) == 6     # the whole file
  assert demo._traces_end(rows, 31, 2) is None  # the file is too short: written for a shorter OPD run


def _demo(workdir, timeout):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
  proc = subprocess.run([sys.executable, "-m", "jopd.demo", "--quick", f"--workdir={workdir}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc


def test_quick_demo_distills_the_student_and_reuses_finished_stages(tmp_path):
  workdir = tmp_path / "demo"
  proc = _demo(workdir, timeout=1200)
  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "seconds"):
    assert isinstance(summary[key], float), key
  assert set(summary["routed"]) == set(demo_task.KINDS)
  for kind, row in summary["routed"].items():
    assert set(row) == {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after"}, kind
    assert all(0.0 <= v <= 1.0 for v in row.values()), (kind, row)
  assert {"opd_accuracy", "sft_accuracy", "opd_tokens", "sft_tokens"} <= set(summary["opd_vs_sft"])
  # The baseline trains on at least as many teacher tokens as the student sampled (whole batches, no fewer).
  assert summary["opd_vs_sft"]["sft_tokens"] >= summary["opd_vs_sft"]["opd_tokens"]
  assert summary["student_accuracy_after"] > summary["student_accuracy_before"], summary
  assert "OPD closed" in proc.stdout and "student after routed OPD" in proc.stdout
  assert (workdir / "distillation.png").stat().st_size > 10_000
  for stage in STAGES:
    assert (workdir / stage / "metrics.jsonl").exists(), stage
  records = [json.loads(line) for line in (workdir / "routed" / "metrics.jsonl").read_text().splitlines()]
  assert all(r["teacher_route/add/scored"] + r["teacher_route/word/scored"] > 0 for r in records)

  # A re-run reuses every stage: no run directory is touched and the figures are the same.
  stamps = {s: (workdir / s / "metrics.jsonl").stat().st_mtime_ns for s in STAGES}
  _demo(workdir, timeout=300)
  assert {s: (workdir / s / "metrics.jsonl").stat().st_mtime_ns for s in STAGES} == stamps
  again = json.loads((workdir / "summary.json").read_text())
  assert again["student_accuracy_after"] == summary["student_accuracy_after"]
  assert again["routed"] == summary["routed"]
