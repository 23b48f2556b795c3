"""jopd/train.py end to end on tiny models: outputs, exact resume after SIGKILL, learning signal, routing, in-run
evals, multi-dataset batches, tokenizer refusal and counted bad rows; in-process: teachers sharing base weights
and num_substeps' sequential updates."""
import json
import os

import jax
import jax.numpy as jnp
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
  records = metrics_lib.read_metrics(log / "metrics.jsonl")
  kl = [r["teacher_kl"] for r in records]
  first, last = np.mean(kl[:5]), np.mean(kl[-5:])
  # Margin: the last five steps' mean KL is at least 15% below the first five's (measured: 24%).
  assert last < 0.85 * first, kl


def test_twenty_steps_of_varying_lengths_compile_nothing_after_the_first(world, tmp_path):
  # Prompts of 1 to 12 terms (4 to 50 characters: three prompt buckets) drawn 4 per step, completions that stop
  # early or not. Without --config.precompile a bucket compiles the first time it appears (with the world's
  # plain student this data compiled again at steps 2 and 3).
  rows = [data_utils.prompt_row("Add " + " + ".join(str(j) for j in range(i % 12 + 1)) + ".") for i in range(24)]
  data = data_utils.write_jsonl(tmp_path / "varied.jsonl", rows)
  # A student whose end-of-text embedding row is scaled up: its (tied) logit swings far above or below the
  # others from one position to the next, so completions stop after varying numbers of tokens.
  tok = world["tokenizer"]
  _, _, params = tiny_world.make_model(tmp_path / "random", tok, seed=0)
  eos = train.stop_token_ids(tok)[0]
  stopper, _, _ = tiny_world.make_model(tmp_path / "stopper", tok, seed=0,
                                        params=dict(params, embed=params["embed"].at[eos].multiply(12.0)))
  log = tmp_path / "varied"
  tiny_world.run_module("jopd.train", "configs/tiny_opd.py", {
      **_base(world, log, max_steps=20, save_every=0, groups_per_batch=2, group_size=2, max_tokens=8),
      "model_name": stopper, "dataset": data, "precompile": True})
  records = metrics_lib.read_metrics(log / "metrics.jsonl")
  compiles = [r["compile/xla_compiles"] for r in records]
  assert len(records) == 20 and compiles[0] > 0, compiles
  # Every bucket was compiled before step 1: the 20 steps compile nothing more at all.
  assert compiles == [compiles[0]] * 20, compiles
  assert len({r["tokens/generated"] for r in records}) > 1, [r["tokens/generated"] for r in records]


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


def test_routed_run_scores_each_row_with_its_teacher_counts_bad_rows_and_evals(world, tmp_path):
  student, teachers, data = _routed_world(world, tmp_path)
  cfg = _write_config(tmp_path / "routed_cfg.py", f"c.teachers = {teachers!r}\nc.groups_per_batch = 4\n"
                      "c.group_size = 1")
  log = tmp_path / "routed_run"
  # In-run evals every 2 steps (and at the last): rows with expected_answer, each routed to its teacher.
  evals = data_utils.write_jsonl(tmp_path / "eval.jsonl", [
      data_utils.prompt_row(f"What is {i} + 2?", teacher="alpha" if i % 2 else "beta", expected_answer=str(i + 2))
      for i in range(3)] + [data_utils.prompt_row("no answer", teacher="alpha")])
  tiny_world.run_module("jopd.train", cfg, {"model_name": student, "dataset": data, "log_path": str(log),
                                            "max_steps": 3, "num_epochs": 0, "eval_dataset": evals,
                                            "eval_every": 2})
  records = metrics_lib.read_metrics(log / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3]
  # The first two steps of 4 are one epoch of the 8 good rows: odd rows route to alpha, even rows to beta.
  assert sum(r.get("teacher_route/alpha/scored", 0) for r in records[:2]) == 4
  assert sum(r.get("teacher_route/beta/scored", 0) for r in records[:2]) == 4
  for r in records:
    assert r.get("teacher_route/alpha/scored", 0) + r.get("teacher_route/beta/scored", 0) == 4, r
  assert all("teacher_kl/alpha" in r or "teacher_kl/beta" in r for r in records)
  assert [r["step"] for r in records if "eval/accuracy" in r] == [2, 3]
  for r in records[1:]:
    assert 0.0 <= r["eval/accuracy"] <= 1.0 and r["eval/samples"] == 3, r
    assert r["eval/rows"] == 3 and r["eval/skipped/no_expected_answer"] == 1, r
    # Greedy samples of the student scored by perturbed teachers: a clearly positive KL.
    assert np.isfinite(r["eval/teacher_kl"]) and r["eval/teacher_kl"] > 0.01, r
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


def test_teachers_on_one_base_model_share_one_copy_of_its_weights(world, tmp_path):
  from jopd import config as config_lib, export, mesh as mesh_lib, runtime
  from models import lora
  student_dir, teachers_raw, _ = _routed_world(world, tmp_path)
  c = config_lib.opd()
  c.param_dtype, c.remat, c.teacher_model = "float32", "none", ""
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  student = runtime.load_model(student_dir, c, mesh)
  # A PEFT adapter on alpha's base model: another teacher (own route value and adapter), same base weights.
  lcfg = lora.LoraConfig(rank=4)
  adapters = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.1 if p[-1].key == "b" else x,
                                              lora.init_adapters(student.cfg, lcfg, jax.random.key(3)))
  adapter_dir = str(tmp_path / "alpha_adapter")
  export.save_peft(adapter_dir, student.cfg, lcfg, adapters, teachers_raw[0]["model_path"])
  c.teachers = teachers_raw + [
      {"name": "alpha2", "model_path": teachers_raw[0]["model_path"], "route_value": "alpha2"},
      {"name": "alpha_lora", "model_path": teachers_raw[0]["model_path"], "route_value": "alpha_lora",
       "checkpoint_path": adapter_dir}]
  teachers = train.load_teachers(c, train.teachers_lib.dataset_teachers_from_config(c), student, mesh)
  alpha = teachers["alpha"].params
  assert teachers["alpha2"].params is alpha and teachers["alpha_lora"].params is alpha
  assert teachers["alpha_lora"].adapters is not None and teachers["alpha"].adapters is None
  assert teachers["beta"].params is not alpha  # another model_path: its own weights
  assert not np.array_equal(teachers["beta"].params["embed"], alpha["embed"])


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


def test_substep_slices_are_disjoint_nonempty_and_cover_the_batch():
  for rows, k in [(4, 2), (5, 2), (5, 4), (7, 7), (16, 3)]:
    slices = train.substep_slices(rows, k)
    covered = [i for sl in slices for i in range(rows)[sl]]
    assert covered == list(range(rows)) and len(slices) == k, (rows, k)
    sizes = [sl.stop - sl.start for sl in slices]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, (rows, k, sizes)
  with pytest.raises(ValueError, match=r"--config.num_substeps=3 for a step of 2 sampled rows; expected 1 to 2"):
    train.substep_slices(2, 3)


def test_num_substeps_updates_on_each_half_in_turn_with_later_ratios_off_one():
  import functools
  from jopd import config as config_lib, update
  from models import lora, qwen3
  cfg = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = qwen3.init_params(cfg, jax.random.key(0), std=0.2)
  lcfg = lora.LoraConfig(rank=4)
  adapters = lora.init_adapters(cfg, lcfg, jax.random.key(1))
  c = config_lib.opd()
  c.num_substeps, c.learning_rate = 2, 1e-2
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, cfg.vocab_size, 4 + i).astype(np.int32) for i in range(4)]
  completions = [rng.integers(1, cfg.vocab_size, 6 - i).astype(np.int32) for i in range(4)]
  # The student's own logprobs of its "samples" (jopd.sampler's agree to 1e-6; scoring compiles faster).
  sampling_lps = scoring.token_logprobs(cfg, params, prompts, completions, adapters=adapters,
                                        lora_scale=lcfg.scale)
  teacher_lps = [ls - rng.uniform(0.2, 1.0, len(ls)).astype(np.float32) for ls in sampling_lps]
  loss_fn = functools.partial(train.opd_loss, cfg, True, lcfg.scale, 1.0, 20.0, "sum", 8)
  optimizer = update.make_optimizer(c, 10)
  fresh = lambda: jax.tree.map(jnp.copy, adapters)  # train_step donates its state

  start = fresh()
  state, m = train.update_on_samples({"trainable": start, "opt_state": optimizer.init(start)}, params, prompts,
                                     completions, sampling_lps, teacher_lps, c, loss_fn=loss_fn,
                                     optimizer=optimizer, mesh=None, shards=1)
  assert len(m["loss"]) == 2
  # The same two updates by hand, on rows [0, 2) and then [2, 4).
  a = fresh()
  opt, by_hand = optimizer.init(a), []
  for sl in (slice(0, 2), slice(2, 4)):
    batch = train.build_batch(prompts[sl], completions[sl], sampling_lps[sl], teacher_lps[sl], c, 1)
    a, opt, mh = update.train_step(a, opt, params, update.put_batch(batch, None), loss_fn=loss_fn,
                                   optimizer=optimizer, num_micro=1)
    by_hand.append(float(mh["loss"]))
  np.testing.assert_allclose(m["loss"], by_hand, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), state["trainable"], a)
  # Substep 1 runs at the sampling policy: ratio 1 and loss = the half's summed sampled reverse KL. Substep 2
  # runs after substep 1's update: ratios off 1, and the loss off its half's KL.
  kl = [sum(float(np.sum(ls - lt)) for ls, lt in zip(sampling_lps[sl], teacher_lps[sl]))
        for sl in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(m["loss"][0], kl[0], rtol=1e-4)
  assert m["ratio/mean"][0] == pytest.approx(1.0, abs=1e-5)
  assert abs(m["ratio/mean"][1] - 1.0) > 1e-3, m["ratio/mean"]
  assert abs(m["loss"][1] - kl[1]) > 1e-3 * abs(kl[1]), (m["loss"], kl)
