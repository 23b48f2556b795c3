"""The demo's synthetic task family: column addition and multiply-then-subtract word problems, each with a short
worked solution ending in `Final: <answer>`, written as the JSONL rows `jopd.sft` and `jopd.train` read.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any, Iterable, Sequence

KINDS = ("add", "word")
_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Joe")
_CONTAINERS = ("boxes", "bags", "jars", "crates", "baskets")
_ITEMS = ("apples", "pens", "coins", "eggs", "shells", "cards", "stamps", "beads")


def _add(rng: random.Random, digits: int) -> tuple[tuple, str, str, int]:
  """Two `digits`-digit numbers; the solution adds columns right to left, writing each carry it uses."""
  lo, hi = 10 ** (digits - 1), 10 ** digits - 1
  a, b = rng.randint(lo, hi), rng.randint(lo, hi)
  steps, carry = [], 0
  for da, db in zip(reversed(str(a)), reversed(str(b))):
    total = int(da) + int(db) + carry
    steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
    carry = total // 10
  return (a, b), f"What is {a} + {b}?", "\n".join(steps), a + b


def _word(rng: random.Random) -> tuple[tuple, str, str, int]:
  """n containers of k items, some sold: the product, then the subtraction column by column (borrowing as
  written), so every step is a one-digit fact that training covers even for a held-out problem."""
  n, k = rng.randint(2, 9), rng.randint(2, 9)
  product = n * k
  sold = rng.randint(1, min(9, product - 1))
  name, container, item = rng.choice(_NAMES), rng.choice(_CONTAINERS), rng.choice(_ITEMS)
  question = f"{name} packs {n} {container} of {k} {item} and sells {sold}. How many remain?"
  steps = [f"{n}*{k}={product}"]
  tens, units = divmod(product, 10)
  if units >= sold or not tens:
    steps.append(f"{units}-{sold}={units - sold}" if tens else f"{product}-{sold}={product - sold}")
  else:
    steps += [f"{units + 10}-{sold}={units + 10 - sold}", f"{tens}-1={tens - 1}"]
  return (n, k, sold), question, "\n".join(steps), product - sold


def _held_out(kind: str, key: tuple, eval_frac: float) -> bool:
  """A fixed split by the problem's numbers, so no evaluated problem (in any wording) is trained on."""
  digest = hashlib.sha256(f"{kind}:{key}".encode()).digest()
  return int.from_bytes(digest[:4], "big") / 2 ** 32 < eval_frac


def problems(kind: str, n: int, *, seed: int, split: str, digits: int = 2, eval_frac: float = 0.15
             ) -> list[dict[str, Any]]:
  """`n` distinct problems of `kind` from the `split` ('train' or 'eval') side of the fixed split: dicts with
  kind, question, solution (worked steps + Final line) and answer."""
  if kind not in KINDS:
    raise ValueError(f"jopd/demo_task.py: kind={kind!r}; expected one of {KINDS}")
  if split not in ("train", "eval"):
    raise ValueError(f"jopd/demo_task.py: split={split!r}; expected 'train' or 'eval'")
  rng = random.Random(f"{kind}:{split}:{seed}")
  out, seen = [], set()
  for _ in range(200 * n):
    key, question, steps, answer = _add(rng, digits) if kind == "add" else _word(rng)
    if _held_out(kind, key, eval_frac) != (split == "eval") or question in seen:
      continue
    seen.add(question)
    out.append({"kind": kind, "question": question, "solution": f"{steps}\nFinal: {answer}",
                "answer": str(answer)})
    if len(out) == n:
      return out
  raise ValueError(f"jopd/demo_task.py: only {len(out)} distinct {kind!r} {split} problems found; asked for {n}")


# ------------------------------------------------------------------------------------------- rows

def sft_row(problem: dict[str, Any], solution: str | None = None) -> dict[str, Any]:
  """A conversation for `jopd.sft`: the question and a worked solution (the reference one by default)."""
  return {"messages": [{"role": "user", "content": problem["question"]},
                       {"role": "assistant", "content": problem["solution"] if solution is None else solution}]}


def prompt_row(problem: dict[str, Any], teacher: str | None = None) -> dict[str, Any]:
  """A prompt row for `jopd.train` (OPD and its eval): the question, the expected answer, and optionally the
  route key naming the teacher that scores it."""
  row = {"messages": [{"role": "user", "content": problem["question"]}], "expected_answer": problem["answer"],
         "extra_info": {"kind": problem["kind"]}}
  if teacher is not None:
    row["teacher"] = teacher
  return row


def layout(workdir: str) -> dict[str, str]:
  """Where every demo file lives under `workdir`; the demo configs and jopd/demo.py both read it."""
  j = lambda *parts: os.path.join(workdir, *parts)
  out = {"workdir": workdir, "tokenizer": j("tokenizer"), "teacher_model": j("models", "teacher"),
         "student_model": j("models", "student"), "cache": j("xla_cache"),
         "student_sft_data": j("data", "student_sft.jsonl"), "opd_prompts": j("data", "opd_prompts.jsonl"),
         "routed_prompts": j("data", "routed_prompts.jsonl"), "routed_eval": j("data", "routed_eval.jsonl"),
         "teacher_traces": j("data", "teacher_traces.jsonl")}
  for kind in KINDS:
    out[f"{kind}_sft_data"] = j("data", f"{kind}_sft.jsonl")
    out[f"{kind}_eval"] = j("data", f"{kind}_eval.jsonl")
    out[f"teacher_{kind}"] = j(f"teacher_{kind}")
  for stage in ("student_sft", "opd", "sft_traces", "routed"):
    out[stage] = j(stage)
  return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> str:
  """Writes rows atomically (a half-written file never looks finished to a re-run)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
  return os.fspath(path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | os.PathLike, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


def corpus(problem_lists: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
  """Texts the demo tokenizer is trained on: every question and solution, and the chat template's role names
  (as often as the questions, so each becomes one token)."""
  texts = [p[field] for ps in problem_lists for p in ps for field in ("question", "solution")]
  return texts + ["user\nassistant\n"] * (len(texts) // 2)
