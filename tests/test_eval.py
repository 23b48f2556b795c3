"""Tests for jopd/eval.py: answer extraction, grading (math-verify and the string fallback), and the eval
loop's aggregation."""
import math
import threading

import pytest

from jopd import eval as E


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{\frac{1}{2}} then \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # last, nested braces
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # escaped braces need not balance
    (r"\boxed {7}", "7"),
    (r"\fbox{3}", "3"),
    (r"\boxed{unclosed", None),
    ("no box", None),
])
def test_extract_boxed(text, expected):
  assert E.extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("6 * 7 = 42\nFinal: 42", "42"),
    ("Final: 1\nwait, no.\nFinal: 2  ", "2"),  # the last line wins
    ("**Final:** 5", "5"),
    ("Final answer: x+1", "x+1"),
    (r"Final: \boxed{9}", "9"),
    (r"work \boxed{8} and more", "8"),
    ("\\boxed{4} hmm\nFinal: 5", "5"),  # an explicit Final line beats an earlier box
    ("The final result: 3", None),  # 'Final' must start the line
    ("no answer at all", None),
])
def test_extract_answer(text, expected):
  assert E.extract_answer(text) == expected


@pytest.mark.parametrize("prediction, expected, correct", [
    ("Final: 42", "42", True),
    ("Final: 42.", 42, True),  # expected answers may be JSON numbers
    ("Final: 43", "42", False),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),  # math-verify equivalence
    (r"\boxed{\dfrac{1}{2}}", "0.5", True),
    ("Final: 1,000", "1000", True),
    (r"\boxed{x^2 + 1}", "1+x^2", True),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),
    ("Final: $12$", "12", True),
    ("Final: Yes", "yes", True),  # word answers: normalized strings
    ("Final: sey", "Yes", False),  # math-verify alone would read both as the product s*e*y
    ("Final: Paris", "London", False),
    ("I think it is 42", "42", False),  # nothing extractable is wrong, even if the number appears
])
def test_grade(prediction, expected, correct):
  assert E.grade(prediction, expected) is correct


def test_grade_works_off_the_main_thread():
  """math-verify's timeouts use SIGALRM, which raises outside the main thread; grading must still work."""
  results = []
  t = threading.Thread(target=lambda: results.append(E.grade(r"\boxed{0.5}", r"\frac{1}{2}")))
  t.start()
  t.join()
  assert results == [True]


def test_evaluate_aggregates_and_batches():
  rows = [{"messages": [], "expected_answer": "4"}, {"messages": []},  # no expected answer: skipped
          {"messages": [], "expected_answer": "6"}, {"messages": [], "expected_answer": "8"}]
  batches = []

  def sample_fn(batch):
    batches.append(len(batch))
    out = []
    for row in batch:
      want = row["expected_answer"]
      if want == "4":
        out.append([E.EvalSample(f"Final: {want}", reverse_kl_sum=3.0, num_tokens=2), "Final: 5"])
      elif want == "6":
        out.append(E.EvalSample(f"\\boxed{{{want}}}", reverse_kl_sum=1.0, num_tokens=2))
      else:
        out.append("no answer")
    return out

  m = E.evaluate(rows, sample_fn, batch_size=2)
  assert batches == [2, 1]
  assert m["eval/samples"] == 4 and m["eval/rows"] == 3 and m["eval/skipped/no_expected_answer"] == 1
  assert m["eval/accuracy"] == pytest.approx(2 / 4)
  assert m["eval/answer_found"] == pytest.approx(3 / 4)
  assert m["eval/teacher_kl"] == pytest.approx(4.0 / 4)


def test_evaluate_errors_and_empty():
  with pytest.raises(ValueError, match="returned 0 results for 1 rows"):
    E.evaluate([{"expected_answer": "1"}], lambda batch: [], batch_size=4)
  m = E.evaluate([{"messages": []}], lambda batch: [], batch_size=4)
  assert math.isnan(m["eval/accuracy"]) and "eval/teacher_kl" not in m
