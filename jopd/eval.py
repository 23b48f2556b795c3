"""Evaluation: answer extraction (`Final: <answer>` lines, nested `\\boxed{...}`), grading with math-verify and
a normalized-string fallback, and the eval loop over rows with `expected_answer` given a sampling function.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger("jopd.eval")

_FINAL_RE = re.compile(r"^[ \t>*_#]*final(?:\s+answer)?[*_]*\s*:[*_]*[ \t]*(.+?)[ \t]*$",
                       re.IGNORECASE | re.MULTILINE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z \t'-]*[A-Za-z]")


def extract_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth; escaped `\\{` `\\}`
  do not count. None when there is none or it never closes."""
  found = None
  for match in _BOXED_RE.finditer(text):
    depth, i = 1, match.end()
    while i < len(text) and depth:
      ch = text[i]
      if ch == "\\":
        i += 2  # skip the escaped character, so \{ and \} are content
        continue
      depth += {"{": 1, "}": -1}.get(ch, 0)
      i += 1
    if depth == 0:
      found = text[match.end():i - 1]
  return found


def extract_final(text: str) -> str | None:
  """The answer on the last `Final: <answer>` line (also `Final answer:`, `**Final:**`), or None."""
  answers = _FINAL_RE.findall(text)
  return answers[-1] if answers else None


def extract_answer(text: str) -> str | None:
  """The model's answer: the last `Final:` line (its `\\boxed{}` content when it has one), else the last
  `\\boxed{}`, else None."""
  final = extract_final(text)
  if final is not None:
    boxed = extract_boxed(final)
    return boxed if boxed is not None else final
  return extract_boxed(text)


def normalize_answer(answer: str) -> str:
  """Lower-cased, without surrounding `$`, `\\text{}`, spaces, trailing period or thousands separators."""
  s = answer.strip()
  while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
    s = s[1:-1].strip()
  s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s)
  s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
  s = s.rstrip(".").strip()
  return re.sub(r"\s+", "", s).lower()


def _math_equal(expected: str, answer: str) -> bool | None:
  """math-verify's verdict, or None when it cannot parse one side (then strings decide)."""
  import math_verify  # sympy import is slow; only graders pay it
  # math-verify times out with SIGALRM, which only the main thread may use.
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  wrap = lambda s: "$" + s.strip().strip("$").strip() + "$"
  try:
    gold = math_verify.parse(wrap(expected), parsing_timeout=timeout)
    pred = math_verify.parse(wrap(answer), parsing_timeout=timeout)
    if not gold or not pred:
      return None
    return bool(math_verify.verify(gold, pred, timeout_seconds=timeout))
  except Exception as e:  # a grader must never take the run down; fall back to strings
    log.debug("math-verify failed on %r vs %r: %s", expected, answer, e)
    return None


def grade(prediction_text: str, expected_answer: Any) -> bool:
  """Whether the answer extracted from `prediction_text` equals `expected_answer`.

  Mathematically equal answers count (`0.5` vs `\\frac{1}{2}`, `1,000` vs `1000`) through math-verify;
  word answers (`Yes`, `Paris`) and anything math-verify cannot parse are compared as normalized strings
  (math-verify would read a word as a product of symbols). No extractable answer is wrong."""
  answer = extract_answer(prediction_text)
  if answer is None or expected_answer is None:
    return False
  expected = str(expected_answer)
  if normalize_answer(answer) == normalize_answer(expected):
    return True
  if _WORD_RE.fullmatch(expected.strip()) and "\\" not in expected:
    return False
  return bool(_math_equal(expected, answer))


# ------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class EvalSample:
  """One sampled completion: its text and, when the teacher scored it, its summed reverse KL and token count."""
  text: str
  reverse_kl_sum: float | None = None
  num_tokens: int | None = None


# Given a batch of rows, returns per row one sample or a list of samples (several completions per prompt).
SampleFn = Callable[[Sequence[Mapping[str, Any]]], Sequence["EvalSample | str | Sequence[EvalSample | str]"]]


def evaluate(rows: Iterable[Mapping[str, Any]], sample_fn: SampleFn, *, batch_size: int,
             prefix: str = "eval/") -> dict[str, float]:
  """Samples and grades every row that has an `expected_answer`; model code enters only through `sample_fn`.

  Returns `<prefix>accuracy` (mean over all samples), `<prefix>answer_found` (fraction of samples with an
  extractable answer), `<prefix>teacher_kl` (per-token mean reverse KL, when samples carry it), and counts
  `<prefix>rows`, `<prefix>samples`, `<prefix>skipped/no_expected_answer`."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"jopd/eval.py evaluate: batch_size={batch_size!r}; expected a positive integer")
  batch, skipped = [], 0
  grades: list[bool] = []
  found, kl_sum, kl_tokens, num_rows = 0, 0.0, 0, 0

  def run(batch):
    nonlocal found, kl_sum, kl_tokens, num_rows
    outputs = sample_fn(batch)
    if len(outputs) != len(batch):
      raise ValueError(f"jopd/eval.py evaluate: sample_fn returned {len(outputs)} results for {len(batch)} rows; "
                       "expected one sample (or list of samples) per row")
    for row, out in zip(batch, outputs):
      num_rows += 1
      for sample in ([out] if isinstance(out, (str, EvalSample)) else out):
        sample = EvalSample(sample) if isinstance(sample, str) else sample
        grades.append(grade(sample.text, row["expected_answer"]))
        found += extract_answer(sample.text) is not None
        if sample.reverse_kl_sum is not None and sample.num_tokens:
          kl_sum += float(sample.reverse_kl_sum)
          kl_tokens += int(sample.num_tokens)

  for row in rows:
    if row.get("expected_answer") is None:
      skipped += 1
      continue
    batch.append(row)
    if len(batch) == batch_size:
      run(batch)
      batch = []
  if batch:
    run(batch)
  metrics = accuracy_metrics(grades, prefix)
  metrics.update({f"{prefix}answer_found": found / len(grades) if grades else float("nan"),
                  f"{prefix}rows": num_rows, f"{prefix}skipped/no_expected_answer": skipped})
  if kl_tokens:
    metrics[f"{prefix}teacher_kl"] = kl_sum / kl_tokens
  return metrics


def accuracy_metrics(grades: Sequence[bool], prefix: str = "eval/") -> dict[str, float]:
  """`<prefix>accuracy` (NaN when nothing was graded, so an empty eval is not mistaken for 0%) and
  `<prefix>samples`."""
  n = len(grades)
  return {f"{prefix}accuracy": sum(map(bool, grades)) / n if n else float("nan"), f"{prefix}samples": n}


def _cli() -> None:
  """`python -m jopd.eval --config=configs/deepmath.py --config.eval_dataset=rows.jsonl [--checkpoint=DIR]`:
  greedy accuracy and teacher KL of a model (a jopd checkpoint or PEFT adapter via --checkpoint), as JSON."""
  import json
  from absl import flags
  from jopd import cli, runtime, train
  config = train.CONFIG_FLAG  # the trainer's --config flag: same configs, same overrides
  checkpoint = flags.DEFINE_string("checkpoint", None, "jopd checkpoint dir or PEFT adapter dir to evaluate "
                                   "(default: --config.load_checkpoint_path, else the base model)")

  def main(argv):
    del argv
    runtime.setup_logging()
    c = config.value
    if c is None:
      raise ValueError("--config=configs/<name>.py is required")
    if checkpoint.value:
      c.load_checkpoint_path = checkpoint.value
    print(json.dumps(train.evaluate_standalone(c), indent=2, sort_keys=True))

  cli.run(main)


if __name__ == "__main__":
  _cli()
