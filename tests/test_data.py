"""Tests for jopd/data: row contract and skips, builders, rendering, grain pipelines (state, sharding, seeds)."""
import json
import logging

import datasets
import numpy as np
import pytest

from jopd.data import builders
from jopd.data import pipeline as pipeline_lib
from jopd.data import render
from jopd.data import rows as rows_lib
from tests import data_utils
from tests.data_utils import prompt_row, user


@pytest.fixture(scope="module")
def tok():
  return data_utils.tiny_tokenizer()


# ---------------------------------------------------------------- malformed JSONL -> counted skips

MALFORMED = [
    prompt_row("What is 1 + 2?"),                                                          # 1 ok
    '{"messages": [{"role": "user", "content": "unterminated"',                            # 2 bad_json
    {"prompt": "no messages key"},                                                         # 3 missing_messages
    {"messages": [{"role": "tool", "content": "x"}]},                                      # 4 bad_role
    {"messages": [user("   ")]},                                                           # 5 empty_content
    prompt_row("What is 3 + 4? " * 40),                                                    # 6 prompt_too_long
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',                             # 7 bad_encoding
    {"messages": [user(["not", "a", "string"])]},                                          # 8 bad_type
    "",                                                                                    # 9 blank: ignored
    "not json either",                                                                     # 10 bad_json again
    [1, 2],                                                                                # 11 bad_type (row)
    {"messages": [{"role": "assistant", "content": "only an answer"}]},                    # 12 empty_messages
    {"messages": [user("What is 5 + 6?"), {"role": "assistant", "content": "Final: 11"}],  # 13 ok, answer
     "expected_answer": "11"},                                                             #    turn dropped
]


def _load(path, tok, strict=False, **kwargs):
  counter = rows_lib.SkipCounter(strict=strict)
  examples = pipeline_lib.load_examples(path, tokenizer=tok, counter=counter, max_prompt_tokens=64, **kwargs)
  return examples, counter


def test_malformed_rows_are_counted_by_reason_and_first_occurrence_logged(tmp_path, tok, caplog):
  path = data_utils.write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
  with caplog.at_level(logging.WARNING, logger="jopd.data"):
    examples, counter = _load(path, tok)
  assert [e["where"] for e in examples] == [f"{path}:1", f"{path}:13"]
  assert examples[1]["row"]["messages"] == [user("What is 5 + 6?")]  # trailing assistant turn dropped
  assert examples[1]["row"]["expected_answer"] == "11"
  assert counter.metrics() == {
      "data/skipped/bad_encoding": 1, "data/skipped/bad_json": 2, "data/skipped/bad_role": 1,
      "data/skipped/bad_type": 2, "data/skipped/empty_content": 1, "data/skipped/empty_messages": 1,
      "data/skipped/missing_messages": 1, "data/skipped/prompt_too_long": 1}
  logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  # One warning per reason (the second bad_json and bad_type are only counted), each naming file:line and field.
  assert len(logged) == len(counter.counts)
  for line, field in [(2, "<line>"), (3, "messages"), (4, "messages[0].role"), (5, "messages[0].content"),
                      (6, "messages"), (7, "<line>"), (8, "messages[0].content"), (12, "messages")]:
    assert any(f"{path}:{line}: field '{field}'" in m for m in logged), (line, logged)
  assert not any(f"{path}:10:" in m or f"{path}:11:" in m for m in logged)


@pytest.mark.parametrize("line, reason, field", [
    ('{"messages": [', "bad_json", "<line>"), ({"messages": [{"role": "robot", "content": "x"}]}, "bad_role",
                                                "messages[0].role"),
    ({"messages": [user(7)]}, "bad_type", "messages[0].content"),
    (prompt_row("What is 3 + 4? " * 40), "prompt_too_long", "messages"),
])
def test_strict_mode_raises_with_file_line_and_field(tmp_path, tok, line, reason, field):
  path = data_utils.write_jsonl(tmp_path / "p.jsonl", [prompt_row("ok"), line])
  with pytest.raises(rows_lib.RowError) as info:
    _load(path, tok, strict=True)
  assert info.value.reason == reason and info.value.field == field
  assert str(info.value).startswith(f"{path}:2: field '{field}'")


def test_route_errors_are_counted_and_teacher_contexts_rendered(tmp_path, tok):
  teachers = {"math": pipeline_lib.TeacherContext(tok),
              "hint": pipeline_lib.TeacherContext(tok, messages_key="hint_messages")}

  def route(row):  # the shape of jopd/teachers.py's routing function
    value = row.get("teacher")
    if value is None:
      raise rows_lib.RowError(rows_lib.MISSING_ROUTE, "teacher", "no route value")
    if value not in teachers:
      raise rows_lib.RowError(rows_lib.UNKNOWN_ROUTE, "teacher", f"{value!r} is not a teacher")
    return value

  secret = [user("What is 6 * 7? The answer is 42.")]
  path = data_utils.write_jsonl(tmp_path / "routed.jsonl", [
      prompt_row("What is 6 * 7?", teacher="math"),
      prompt_row("What is 6 * 7?", teacher="math", teacher_messages=secret),
      prompt_row("What is 6 * 7?", teacher="hint", hint_messages=secret, teacher_messages=[user("ignored")]),
      prompt_row("What is 6 * 7?", teacher="nobody"),
      prompt_row("What is 6 * 7?"),
      prompt_row("What is 6 * 7?", teacher="hint", hint_messages=[{"role": "user", "content": ""}]),
  ])
  examples, counter = _load(path, tok, route=route, teacher_contexts=teachers)
  assert counter.metrics() == {"data/skipped/empty_content": 1, "data/skipped/missing_route": 1,
                               "data/skipped/unknown_route": 1}
  plain, privileged, hinted = examples
  assert [e["teacher"] for e in examples] == ["math", "math", "hint"]
  assert plain["teacher_ids"] is plain["prompt_ids"]
  expected = render.render_prompt(tok, secret)
  np.testing.assert_array_equal(privileged["teacher_ids"], expected)
  np.testing.assert_array_equal(hinted["teacher_ids"], expected)
  np.testing.assert_array_equal(privileged["prompt_ids"], plain["prompt_ids"])


def test_render_uses_chat_template_with_generation_prompt(tok):
  messages = [{"role": "system", "content": "be brief"}, user("What is 2 + 2?")]
  ids = render.render_prompt(tok, messages)
  assert ids.dtype == np.int32
  assert tok.decode(ids) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                             "<|im_start|>assistant\n")
  with pytest.raises(rows_lib.RowError, match=r"\d+ tokens once rendered; max_prompt_tokens=5"):
    render.render_prompt(tok, messages, max_tokens=5)
  assert len(render.render_prompt(tok, messages, max_tokens=len(ids))) == len(ids)  # the limit is inclusive


# ---------------------------------------------------------------- builders

def test_builders_map_local_parquet_and_jsonl(tmp_path):
  deepmath = str(tmp_path / "deepmath.parquet")
  datasets.Dataset.from_list([
      {"question": "Compute 2+2.", "final_answer": "4", "difficulty": 1.0, "topic": "arith", "r1_solution_1": "x"},
      {"question": "Integrate x.", "final_answer": "x^2/2", "difficulty": 5.0, "topic": "calc", "r1_solution_1": "y"},
  ]).to_parquet(deepmath)
  records = list(builders.read_records("deepmath", deepmath, cache_dir=str(tmp_path / "cache")))
  assert [r.where for r in records] == [f"{deepmath}:1", f"{deepmath}:2"]
  assert records[1].row == {"messages": [user("Integrate x.")], "expected_answer": "x^2/2",
                            "extra_info": {"difficulty": 5.0, "topic": "calc"}}

  tulu = str(tmp_path / "tulu.parquet")
  datasets.Dataset.from_list([
      {"id": "a", "source": "s", "messages": [{"role": "system", "content": "sys"}, user("first"),
                                              {"role": "assistant", "content": "reply"}, user("second")]},
      {"id": "b", "source": "s", "messages": [{"role": "assistant", "content": "no user"}]},
  ]).to_parquet(tulu)
  first, no_user = builders.read_records("tulu3", [tulu], cache_dir=str(tmp_path / "cache"))
  assert first.row == {"messages": [user("first")], "extra_info": {"id": "a", "source": "s"}}
  assert no_user.error.reason == "empty_messages"

  ot3 = data_utils.write_jsonl(tmp_path / "ot3.jsonl", [
      {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "domain": "math"},
      {"conversations": "oops"}])
  good, bad = builders.read_records("openthoughts3", ot3)
  assert good.row["messages"] == [user("Q"), {"role": "assistant", "content": "A"}]
  assert builders.BUILDERS["openthoughts3"].keep_assistant
  assert (bad.where, bad.error.reason, bad.error.field) == (f"{ot3}:2", "bad_type", "conversations")

  chat = data_utils.write_jsonl(tmp_path / "chat.jsonl", [prompt_row(f"q{i}", expected_answer=str(i))
                                                          for i in range(5)])
  assert [r.row["expected_answer"] for r in builders.read_records("messages", chat, max_rows=3)] == ["0", "1", "2"]
  assert [r.row for r in builders.read_records(chat)] == [r.row for r in builders.read_records("jsonl", chat)]


def test_builder_config_errors_name_the_field():
  with pytest.raises(ValueError, match="'dataset'='nope' is neither a builder"):
    builders.resolve("nope")
  with pytest.raises(ValueError, match="'data_files'.*must end in .jsonl or .parquet"):
    builders.resolve("deepmath", ["x.csv"])
  with pytest.raises(ValueError, match="'messages' needs 'data_files'"):
    builders.resolve("messages")


def test_hub_dataset_offline_error_says_to_use_data_files(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'zwhe99/DeepMath-103K' on the Hub (OfflineModeIsEnabled)")
  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(RuntimeError, match="zwhe99/DeepMath-103K.*--config.data_files"):
    list(builders.read_records("deepmath"))


# ---------------------------------------------------------------- pipelines

def _ids(batches):
  return [list(batch) for batch in batches]


def test_iterator_state_round_trip_resumes_exactly():
  rows = list(range(23))
  kwargs = dict(groups_per_batch=4, seed=7, num_epochs=None)
  first = pipeline_lib.Pipeline(rows, **kwargs)
  [next(first) for _ in range(9)]  # crosses the first epoch boundary (5 batches per epoch)
  state = json.loads(json.dumps(first.get_state()))
  continued = _ids(next(first) for _ in range(6))
  restored = pipeline_lib.Pipeline(rows, **kwargs)
  restored.set_state(state)
  assert _ids(next(restored) for _ in range(6)) == continued
  with pytest.raises(ValueError, match="saved with seed=7 but this run has seed=8"):
    pipeline_lib.Pipeline(rows, **{**kwargs, "seed": 8}).set_state(state)


def test_processes_get_disjoint_shards_that_cover_the_dataset():
  rows = list(range(24))
  shards = [[x for batch in pipeline_lib.Pipeline(rows, groups_per_batch=3, seed=1, num_epochs=1,
                                                  process_index=p, process_count=2) for x in batch]
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 12
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == rows
  # 25 rows on 2 processes: still equal shares (a 13th batch row for one process would hang the other).
  uneven = [list(pipeline_lib.Pipeline(list(range(25)), groups_per_batch=3, seed=1, num_epochs=1,
                                       process_index=p, process_count=2)) for p in range(2)]
  assert len(uneven[0]) == len(uneven[1]) == 4


def test_seed_fixes_the_order_and_epochs_reshuffle():
  rows = list(range(30))

  def order(seed, num_epochs=1):
    return [x for b in pipeline_lib.Pipeline(rows, groups_per_batch=5, seed=seed, num_epochs=num_epochs)
            for x in b]

  assert order(3) == order(3)
  assert order(3) != order(4)
  assert order(3) != rows
  two = order(3, num_epochs=2)
  assert len(two) == 60 and sorted(two[:30]) == rows and sorted(two[30:]) == rows and two[:30] != two[30:]
  assert order(3, num_epochs=2)[:30] == order(3)


def test_end_of_data_stops_and_small_datasets_are_refused():
  assert len(list(pipeline_lib.Pipeline(list(range(10)), groups_per_batch=3, num_epochs=2))) == 6
  with pytest.raises(ValueError, match="fewer than groups_per_batch=8"):
    pipeline_lib.Pipeline(list(range(10)), groups_per_batch=8, process_count=2)


def test_multi_dataset_batches_take_groups_per_batch_from_each():
  math = [{"q": f"deepmath{i}"} for i in range(12)]
  chat = [{"q": f"tulu3-{i}"} for i in range(20)]

  def make():
    return pipeline_lib.MultiPipeline({
        "deepmath": pipeline_lib.Pipeline(math, groups_per_batch=2, seed=0, name="deepmath"),
        "tulu3": pipeline_lib.Pipeline(chat, groups_per_batch=3, seed=0, name="tulu3")})

  multi = make()
  for _ in range(8):
    batch = next(multi)
    assert [e["dataset"] for e in batch] == ["deepmath"] * 2 + ["tulu3"] * 3
    assert all(e["q"].startswith(e["dataset"]) for e in batch)
  state = json.loads(json.dumps(multi.get_state()))
  restored = make()
  restored.set_state(state)
  assert [next(restored) for _ in range(3)] == [next(multi) for _ in range(3)]
  assert "dataset" not in math[0]  # tagging copies, never mutates the shared examples


def test_examples_flow_from_jsonl_into_batches(tmp_path, tok):
  path = data_utils.write_jsonl(tmp_path / "p.jsonl", [prompt_row(f"What is {i} + 1?", expected_answer=str(i + 1))
                                                       for i in range(8)] + ["{bad"])
  examples, counter = _load(path, tok, name="arith")
  assert counter.total == 1 and len(examples) == 8
  batch = next(pipeline_lib.Pipeline(examples, groups_per_batch=4, seed=0))
  assert len(batch) == 4 and {e["dataset"] for e in batch} == {"arith"}
  for e in batch:
    assert tok.decode(e["prompt_ids"]).startswith("<|im_start|>user\nWhat is ")
    assert e["row"]["expected_answer"] == str(int(e["row"]["messages"][0]["content"].split()[2]) + 1)
