"""`python -m jopd.demo [--workdir=DIR] [--quick]`: teacher SFT -> weak student -> OPD -> routed multi-teacher on
tiny Qwen3 models on a CPU, each stage a real `python -m jopd.sft|train` run (docs/demo.md); finished stages reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time

from jopd import demo_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "DONE.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes and step counts; --quick trades accuracy for a run of about five minutes."""
  train_problems: int = 6000                # per kind
  eval_problems: int = 200                  # per kind, held out by their numbers
  teacher_steps: int = 400                  # per teacher
  student_steps: int = 300                  # ~30%: OPD stalls from a student that rarely samples a right digit
  opd_steps: int = 100
  eval_every: int = 10
  vocab_size: int = 400
  max_new_tokens: int = 32


FULL = Settings()
# Teachers need 250-400 steps: held-out accuracy jumps from <10% to >50% between steps 150 and 250 on one CPU,
# but on an AVX2 Zen 3 (other kernels, other float order) the addition teacher was still at 23% after 250, below
# the student it was to teach; so --quick trains them as long as the full run.
# No evals inside the quick OPD runs: the trainer's first eval compiles ~10 s of programs. 40 OPD steps, not
# 20: after 20 (10 of them warm-up) the add accuracy had moved by -0.09 to +0.04 depending on the order of float
# sums; after 40 it rose 0.33 -> 0.49 and 0.24 -> 0.44 (teachers 0.63 / 0.52) in the same two settings.
QUICK = Settings(eval_problems=100, teacher_steps=400, student_steps=300, opd_steps=40, eval_every=0)
TEACHER = dict(hidden=96, layers=3, heads=4, kv_heads=2, head_dim=24, intermediate=288)
STUDENT = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=192)


# ============================================================================================ data and models

def prepare(paths: dict, s: Settings) -> None:
  """Problems, JSONL files, the tokenizer and the two randomly initialised model directories (once)."""
  ready = os.path.join(paths["workdir"], "data", "READY")
  if os.path.exists(ready):
    return
  from jopd.data import tokenizer as tokenizer_lib
  train = {k: demo_task.problems(k, s.train_problems, seed=0, split="train") for k in demo_task.KINDS}
  held = {k: demo_task.problems(k, s.eval_problems, seed=0, split="eval") for k in demo_task.KINDS}
  os.makedirs(os.path.dirname(paths["opd_prompts"]), exist_ok=True)
  half = s.train_problems // 2
  for k in demo_task.KINDS:
    # Teachers learn from the first half; the student's prompts come from the other half.
    demo_task.write_jsonl(paths[f"{k}_sft_data"], [demo_task.sft_row(p) for p in train[k][:half]])
    demo_task.write_jsonl(paths[f"{k}_eval"], [demo_task.prompt_row(p, k) for p in held[k]])
  student = [p for pair in zip(*(train[k][half:] for k in demo_task.KINDS)) for p in pair]
  demo_task.write_jsonl(paths["student_sft_data"], [demo_task.sft_row(p) for p in student])
  demo_task.write_jsonl(paths["opd_prompts"], [demo_task.prompt_row(p) for p in train["add"][half:]])
  demo_task.write_jsonl(paths["routed_prompts"], [demo_task.prompt_row(p, p["kind"]) for p in student])
  demo_task.write_jsonl(paths["routed_eval"],
                        [demo_task.prompt_row(p, k) for pair in zip(*held.values()) for p, k in zip(pair, held)])
  tok = tokenizer_lib.train_tokenizer(demo_task.corpus(list(train.values())), s.vocab_size, paths["tokenizer"])
  _save_model(paths["teacher_model"], tok, TEACHER, seed=1)
  _save_model(paths["student_model"], tok, STUDENT, seed=2)
  open(ready, "w").close()


def _save_model(path: str, tokenizer, shape: dict, seed: int) -> None:
  import jax
  from models import hf, qwen3
  cfg = qwen3.Qwen3Config(vocab_size=len(tokenizer), hidden_size=shape["hidden"],
                          intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                          num_heads=shape["heads"], num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                          tie_word_embeddings=True, rope_theta=10000.0)
  hf.save_pretrained(path, cfg, qwen3.init_params(cfg, jax.random.key(seed)))
  tokenizer.save_pretrained(path)


# ============================================================================================ stages

@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run: `python -m module --config=config --config.k=v ...` writing into log_path."""
  name: str
  log_path: str
  module: str
  config: str
  overrides: dict
  steps: int

  def command(self) -> list[str]:
    return ([sys.executable, "-m", self.module, f"--config={self.config}"]
            + [f"--config.{k}={v}" for k, v in self.overrides.items()])


def run_stages(*stages: Stage) -> dict[str, float | None]:
  """Runs the stages side by side (they do not depend on each other; tiny models leave cores idle, so two or
  three processes finish sooner than one after another), skipping any whose log_path holds a finished run.
  A progress bar per stage follows its metrics.jsonl. Returns seconds per stage, None where reused."""
  from tqdm import tqdm
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  # One CPU device per run: simulated devices (the test suite's XLA_FLAGS) would only add collectives.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  seconds: dict[str, float | None] = {}
  running = []
  t0 = time.time()
  for stage in stages:
    if os.path.exists(os.path.join(stage.log_path, DONE)):
      print(f"{stage.name:<12}: reusing the finished run in {stage.log_path}")
      seconds[stage.name] = None
      continue
    os.makedirs(stage.log_path, exist_ok=True)
    log_file = open(os.path.join(stage.log_path, "stdout.log"), "w")
    proc = subprocess.Popen(stage.command(), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    bar = tqdm(total=stage.steps, desc=f"{stage.name:<12}", unit="step", dynamic_ncols=True, position=len(running))
    running.append((stage, proc, log_file, bar))
  try:
    while any(proc.poll() is None for _, proc, _, _ in running):
      time.sleep(0.5)
      for stage, proc, _, bar in running:
        _follow(stage, bar)
        if proc.returncode is not None and stage.name not in seconds:
          seconds[stage.name] = time.time() - t0
  finally:
    for stage, proc, log_file, bar in running:
      if proc.poll() is None:  # another stage failed, or Ctrl-C: stop the rest (they resume on a re-run)
        proc.terminate()
        proc.wait()
      _follow(stage, bar)
      bar.close()
      log_file.close()
  for stage, proc, _, _ in running:
    if proc.returncode != 0:
      with open(os.path.join(stage.log_path, "stdout.log")) as f:
        tail = f.read()[-4000:]
      raise RuntimeError(f"stage {stage.name}: `{' '.join(stage.command())}` exited with {proc.returncode}; the "
                         f"end of its log ({stage.log_path}/stdout.log):\n{tail}")
    seconds.setdefault(stage.name, time.time() - t0)
    with open(os.path.join(stage.log_path, DONE), "w") as f:
      json.dump({"seconds": seconds[stage.name], "command": stage.command()}, f)
  return seconds


def _follow(stage: Stage, bar) -> None:
  """Moves the bar to the last step in the stage's metrics.jsonl (a half-written last line waits)."""
  try:
    with open(os.path.join(stage.log_path, "metrics.jsonl")) as f:
      last = json.loads(f.read().splitlines()[-1])
  except (OSError, IndexError, ValueError):
    return
  shown = {k.split("/")[-1]: f"{last[k]:.3g}" for k in ("teacher_kl", "train/nll", "eval/accuracy") if k in last}
  bar.set_postfix(shown, refresh=False)
  bar.update(last["step"] - bar.n)


# ============================================================================================ evaluation

class Evaluator:
  """Greedy accuracy of a model directory plus an optional jopd checkpoint, per task kind, through the same
  sampler and grader the trainer uses; results are cached in `<workdir>/accuracies.json`."""

  def __init__(self, paths: dict, s: Settings):
    self.paths, self.s = paths, s
    self.cache_file = os.path.join(paths["workdir"], "accuracies.json")
    self.cache = demo_task.read_json(self.cache_file) if os.path.exists(self.cache_file) else {}

  def accuracy(self, name: str, model_dir: str, checkpoint: str, kinds=demo_task.KINDS) -> dict[str, float]:
    entry = self.cache.get(name, {})
    if entry.get("checkpoint") != checkpoint_id(checkpoint):  # a stage re-run since: its figures are stale
      entry = {"checkpoint": checkpoint_id(checkpoint)}
    missing = [k for k in kinds if k not in entry]
    if missing:
      from jopd import eval as eval_lib
      policy = self.load(model_dir, checkpoint)
      for kind in missing:
        rows = demo_task.read_jsonl(self.paths[f"{kind}_eval"])
        texts = self.generate(policy, [r["messages"] for r in rows], f"eval {kind}")
        grades = [eval_lib.grade(t, r["expected_answer"]) for (t, _), r in zip(texts, rows)]
        entry[kind] = sum(grades) / len(grades)
      self.cache[name] = entry
      demo_task.write_json(self.cache_file, self.cache)
    return {k: entry[k] for k in kinds}

  def load(self, model_dir: str, checkpoint: str):
    import jax
    import jax.numpy as jnp
    from jopd import checkpoint as ckpt_lib, config as config_lib, runtime
    from jopd import mesh as mesh_lib
    from models import lora
    jax.config.update("jax_compilation_cache_dir", self.paths["cache"])
    c = config_lib.common()
    c.param_dtype, c.remat = "float32", "none"
    model = runtime.load_model(model_dir, c, mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params, adapters, scale = model.params, None, 1.0
    if checkpoint:
      trainable, meta = ckpt_lib.load_trainable(checkpoint)
      lcfg = lora.LoraConfig.from_meta(meta)
      if lcfg.enabled:
        adapters, scale = jax.tree.map(jnp.asarray, trainable), lcfg.scale
      else:
        params = jax.tree.map(jnp.asarray, trainable)
    return model, params, adapters, scale

  def generate(self, policy, conversations, desc: str, *, temperature: float = 0.0, seed: int = 0,
               batch: int = 256) -> list[tuple[str, int]]:
    """(text, completion tokens with the stop token) per conversation, sampled with the trainer's sampler."""
    import jax
    from tqdm import tqdm
    from jopd import sampler, train
    from jopd.data import render
    model, params, adapters, scale = policy
    stop = train.stop_token_ids(model.tokenizer)
    out = []
    for start in tqdm(range(0, len(conversations), batch), desc=f"{desc:<12}", unit="batch", leave=False):
      prompts = [render.render_prompt(model.tokenizer, m) for m in conversations[start:start + batch]]
      result = sampler.sample(model.cfg, params, prompts, adapters=adapters, lora_scale=scale,
                              max_new_tokens=self.s.max_new_tokens, temperature=temperature, stop_token_ids=stop,
                              rng=jax.random.key(seed + start))
      out += [(model.tokenizer.decode(t, skip_special_tokens=True), len(t)) for t in result.tokens]
    return out


def _traces_end(rows: list[dict], tokens: int, batch: int) -> int | None:
  """Where `teacher_traces` stops on these rows: the first whole number of batches holding >= `tokens`."""
  total = 0
  for i, row in enumerate(rows):
    if total >= tokens and not i % batch:
      return i
    total += row["extra_info"]["tokens"]
  return len(rows) if total >= tokens and not len(rows) % batch else None


def teacher_traces(paths: dict, ev: Evaluator, tokens: int, group_size: int, batch: int) -> tuple[int, int]:
  """The off-policy baseline's data: the teacher's own samples (temperature 1, `group_size` per prompt, the
  prompts OPD draws from) until they hold `tokens` completion tokens, rounded up to whole batches of `batch`.
  Returns (traces, tokens) written to paths['teacher_traces']."""
  if os.path.exists(paths["teacher_traces"]):
    rows = demo_task.read_jsonl(paths["teacher_traces"])
    if _traces_end(rows, tokens, batch) == len(rows):  # written for this token count (not an earlier OPD length)
      return len(rows), sum(r["extra_info"]["tokens"] for r in rows)
  teacher = ev.load(paths["teacher_model"], _checkpoints(paths["teacher_add"]))
  prompts = itertools.cycle(demo_task.read_jsonl(paths["opd_prompts"]))
  rows, total = [], 0
  while total < tokens or len(rows) % batch:
    group = [p for p in itertools.islice(prompts, 512 // group_size) for _ in range(group_size)]
    samples = ev.generate(teacher, [p["messages"] for p in group], "traces", temperature=1.0, seed=len(rows))
    for p, (text, n) in zip(group, samples):
      if total >= tokens and not len(rows) % batch:
        break
      rows.append({"messages": p["messages"] + [{"role": "assistant", "content": text}],
                   "extra_info": {"tokens": n}})
      total += n
  demo_task.write_jsonl(paths["teacher_traces"], rows)
  return len(rows), total


def checkpoint_id(checkpoint: str) -> list | None:
  """What identifies the weights under a checkpoint directory: its newest step and that step's modification
  time (a stage deleted and re-run writes a new one), or None without a checkpoint."""
  if not checkpoint or not os.path.isdir(checkpoint):
    return None
  steps = [int(d) for d in os.listdir(checkpoint) if d.isdigit()]
  if not steps:
    return None
  return [max(steps), os.stat(os.path.join(checkpoint, str(max(steps)))).st_mtime_ns]


def _checkpoints(log_path: str) -> str:
  return os.path.join(log_path, "checkpoints")


# ============================================================================================ report

def plot(paths: dict, teacher_acc: dict, before: dict, after: dict, routed_after: dict, out: str) -> None:
  """Student held-out accuracy and teacher KL against OPD step, for the single- and the routed-teacher run.
  Accuracy points: the demo's own evaluation before and after, and the trainer's `eval/accuracy` in between."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mean = lambda accs: sum(accs.values()) / len(accs)
  runs = {"OPD (addition teacher)": ("opd", before["add"], after["add"], ("teacher_kl",)),
          "routed OPD (two teachers; both kinds)": ("routed", mean(before), mean(routed_after),
                                                    tuple(f"teacher_kl/{k}" for k in demo_task.KINDS))}
  fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
  for (label, (stage, start, end, kl_keys)), color in zip(runs.items(), ("C0", "C1")):
    records = demo_task.read_jsonl(os.path.join(paths[stage], "metrics.jsonl"))
    evals = [(r["step"], r["eval/accuracy"]) for r in records[:-1] if "eval/accuracy" in r]
    evals = [(0, start)] + evals + [(records[-1]["step"], end)]
    ax_acc.plot(*zip(*evals), marker="o", color=color, label=label)
    for key, style in zip(kl_keys, ("-", "--")):
      steps, kl = zip(*[(r["step"], r[key]) for r in records if key in r])
      ax_kl.plot(steps, _smooth(kl), style, color=color, label=f"{label}: {key}")
  ax_acc.axhline(teacher_acc["add"], color="gray", linestyle=":", label="addition teacher")
  ax_acc.set(xlabel="OPD step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02), title="student accuracy")
  ax_kl.set(xlabel="OPD step", ylabel="reverse KL per token (nats)",
            title="teacher KL on the student's samples (5-step mean)")
  ax_acc.legend(fontsize=8)
  ax_kl.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _smooth(values, window: int = 5) -> list[float]:
  """Trailing mean: one step's sampled KL is noisy."""
  return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def table(summary: dict) -> str:
  """The accuracies (held-out, greedy) as printed at the end of the demo."""
  pct = lambda x: f"{100 * x:.1f}%"
  routed, vs = summary["routed"], summary["opd_vs_sft"]
  size = lambda shape: f"{shape['layers']} layers x {shape['hidden']}"
  row = lambda label, cells: f"{label:<50}" + "".join(f"{c:>8}" for c in cells)
  per_kind = lambda field: [pct(routed[k][field]) for k in demo_task.KINDS]
  lines = [row("held-out accuracy", demo_task.KINDS),
           row(f"teachers (SFT, {size(TEACHER)})", per_kind("teacher_accuracy")),
           row(f"student before OPD (brief SFT, {size(STUDENT)})", per_kind("student_accuracy_before")),
           row("student after OPD from the addition teacher", [pct(summary["student_accuracy_after"]), "-"]),
           row("student after SFT on teacher traces (same tokens)", [pct(vs["sft_accuracy"]), "-"]),
           row("student after routed OPD from both teachers", per_kind("student_accuracy_after")),
           "",
           f"OPD closed {100 * summary['gap_closed']:.0f}% of the teacher-student gap on addition.",
           f"At {vs['opd_tokens']} student-sampled tokens, OPD reached {pct(vs['opd_accuracy'])}; SFT on "
           f"{vs['sft_tokens']} teacher-written tokens reached {pct(vs['sft_accuracy'])}.",
           f"{summary['seconds']:.0f} s"
           + (f" (reused from an earlier run: {', '.join(summary['reused_stages'])})" if summary["reused_stages"]
              else "") + f"; outputs in {summary['workdir']}"]
  return "\n".join(lines)


# ============================================================================================ main

def run(workdir: str, s: Settings) -> dict:
  t0 = time.time()
  paths = demo_task.layout(os.path.abspath(workdir))
  workdir = paths["workdir"]
  config = lambda name, arg: f"{os.path.join(REPO, 'configs', name)}:{arg}"
  prepare(paths, s)
  ev = Evaluator(paths, s)

  # Three rounds of stages that can run side by side: what each round needs comes from the rounds before.
  seconds = run_stages(
      *(Stage(f"teacher_{k}", paths[f"teacher_{k}"], "jopd.sft", config("demo_teacher_sft.py", f"{workdir},{k}"),
              {"max_steps": s.teacher_steps}, s.teacher_steps) for k in demo_task.KINDS),
      Stage("student_sft", paths["student_sft"], "jopd.sft", config("demo_student_sft.py", workdir),
            {"max_steps": s.student_steps}, s.student_steps))
  teacher_acc = {k: ev.accuracy(f"teacher_{k}", paths["teacher_model"], _checkpoints(paths[f"teacher_{k}"]), (k,))[k]
                 for k in demo_task.KINDS}
  before = ev.accuracy("student_sft", paths["student_model"], _checkpoints(paths["student_sft"]))

  opd = {"max_steps": s.opd_steps, "eval_every": s.eval_every}
  seconds.update(run_stages(Stage("opd", paths["opd"], "jopd.train", config("demo_opd.py", workdir), opd, s.opd_steps),
                            Stage("routed", paths["routed"], "jopd.train", config("demo_routed.py", workdir), opd,
                                  s.opd_steps)))
  after = ev.accuracy("opd", paths["student_model"], _checkpoints(paths["opd"]), ("add",))["add"]
  routed_after = ev.accuracy("routed", paths["student_model"], _checkpoints(paths["routed"]))

  # The baseline matches OPD's batch shape and the number of tokens OPD sampled from the student.
  opd_config = demo_task.read_json(os.path.join(paths["opd"], "config.json"))
  opd_tokens = sum(r["tokens/generated"] for r in demo_task.read_jsonl(os.path.join(paths["opd"], "metrics.jsonl")))
  batch = opd_config["groups_per_batch"] * opd_config["group_size"]
  traces, sft_tokens = teacher_traces(paths, ev, opd_tokens, opd_config["group_size"], batch)
  sft = {"dataset": paths["teacher_traces"], "load_checkpoint_path": _checkpoints(paths["student_sft"]),
         "log_path": paths["sft_traces"], "batch_size": batch, "max_steps": traces // batch,
         "lr_schedule": opd_config["lr_schedule"], "warmup_steps": opd_config["warmup_steps"]}
  seconds.update(run_stages(Stage("sft_traces", paths["sft_traces"], "jopd.sft",
                                  config("demo_student_sft.py", workdir), sft, traces // batch)))
  sft_acc = ev.accuracy("sft_traces", paths["student_model"], _checkpoints(paths["sft_traces"]), ("add",))["add"]

  gap = teacher_acc["add"] - before["add"]
  summary = {
      "teacher_accuracy": teacher_acc["add"], "student_accuracy_before": before["add"],
      "student_accuracy_after": after, "gap_closed": (after - before["add"]) / gap if gap > 0 else float("nan"),
      "routed": {k: {"teacher_accuracy": teacher_acc[k], "student_accuracy_before": before[k],
                     "student_accuracy_after": routed_after[k]} for k in demo_task.KINDS},
      "opd_vs_sft": {"opd_accuracy": after, "sft_accuracy": sft_acc, "opd_tokens": opd_tokens,
                     "sft_tokens": sft_tokens, "opd_steps": s.opd_steps, "sft_steps": traces // batch},
      "stage_seconds": {k: v for k, v in seconds.items() if v is not None},
      "reused_stages": [k for k, v in seconds.items() if v is None], "workdir": workdir, "quick": s is QUICK,
  }
  plot(paths, teacher_acc, before, {"add": after}, routed_after, os.path.join(workdir, "distillation.png"))
  summary["seconds"] = time.time() - t0
  demo_task.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jopd.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="outputs; default runs/demo (runs/demo-quick with --quick)")
  parser.add_argument("--quick", action="store_true", help="fewer steps: about five minutes, lower accuracies")
  args = parser.parse_args(argv)
  workdir = args.workdir or os.path.join("runs", "demo-quick" if args.quick else "demo")
  summary = run(workdir, QUICK if args.quick else FULL)
  print(table(summary))


if __name__ == "__main__":
  main()
