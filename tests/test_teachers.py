"""Tests for jopd/teachers.py: config validation and defaults, routing, the tokenizer compatibility check, env
parsing and configs/routed.py reading it."""
import json
import os

import ml_collections
import pytest
import tokenizers
import transformers

from jopd import teachers as T
from jopd.data.rows import RowError
from jopd.data.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS_A = ["the cat sat on the mat", "two plus two is four", "Final: 42"] * 20
TEXTS_B = ["zebra quartz vexing jumps", "xylophone yak yodel", "Final: 7"] * 20


# ------------------------------------------------------------------------------------------- configs

def test_defaults_resolve_to_model_path():
  t = T.teacher_from_dict({"model_path": "Qwen/Qwen3-32B"})
  assert (t.name, t.route_value, t.tokenizer_path, t.checkpoint_path) == ("Qwen/Qwen3-32B",) * 3 + (None,)
  assert t.teacher_messages_key == "teacher_messages"
  t = T.teacher_from_dict({"model_path": "/m", "route_value": "math"})
  assert (t.name, t.route_value, t.tokenizer_path) == ("math", "math", "/m")
  assert T.teacher_from_dict("/m") == T.TeacherConfig("/m", "/m")
  # The dataclass itself resolves defaults, and round-trips through to_dict.
  t = T.TeacherConfig("m", "/m", checkpoint_path="/adapter")
  assert T.teacher_from_dict(t.to_dict()) == t and t.route_value == "/m"


@pytest.mark.parametrize("raw, field, hint", [
    ({"model_path": "/m", "route_valeu": "x"}, "teachers[0].route_valeu", "'route_value'"),
    ({"base_model": "/m"}, "teachers[0].base_model", "'model_path'"),  # the reference recipe's name
    ({"model_path": "/m", "name": "  "}, "teachers[0].name", "non-empty"),
    ({"model_path": ""}, "teachers[0].model_path", "non-empty"),
    ({"model_path": "/m", "route_value": 3}, "teachers[0].route_value", "non-empty string"),
    ({"name": "x"}, "teachers[0].model_path", "missing"),
])
def test_bad_teacher_fields_name_the_field(raw, field, hint):
  with pytest.raises(T.TeacherConfigError) as e:
    T.parse_teachers([raw])
  assert f"jopd/teachers.py: {field}:" in str(e.value) and hint in str(e.value)


def test_unique_route_values_and_names():
  with pytest.raises(T.TeacherConfigError, match=r"teachers\[1\]\.route_value: '/m' is also"):
    T.parse_teachers([{"model_path": "/m"}, {"model_path": "/m", "checkpoint_path": "/lora"}])
  with pytest.raises(T.TeacherConfigError, match=r"teachers\[1\]\.name: 'a' is also"):
    T.parse_teachers([{"model_path": "/m", "name": "a", "route_value": "x"},
                      {"model_path": "/m", "name": "a", "route_value": "y"}])
  with pytest.raises(T.TeacherConfigError, match="non-empty list"):
    T.parse_teachers([])


@pytest.mark.parametrize("groups", [0, -1, 2.5, True, "8", None])
def test_groups_per_batch_must_be_positive_int(groups):
  with pytest.raises(T.TeacherConfigError, match=r"datasets\[1\]\.groups_per_batch: expected a positive integer"):
    T.parse_datasets([{"dataset": "deepmath", "teacher": "/a", "groups_per_batch": 4},
                      {"dataset": "tulu3", "teacher": "/b", "groups_per_batch": groups}])


def test_dataset_modes_and_configdict_input():
  config = ml_collections.ConfigDict({"datasets": [
      {"dataset": "deepmath", "groups_per_batch": 2, "teacher": {"model_path": "/big", "name": "math"}},
      {"dataset": "/data/routed.jsonl", "groups_per_batch": 3, "data_files": ["a.jsonl"],
       "teachers": [{"model_path": "/big", "name": "math"}, {"model_path": "/big", "route_value": "chem",
                                                             "checkpoint_path": "/lora"}]},
  ]})
  specs = T.parse_datasets(config.datasets)
  assert specs[0].route_key is None and specs[1].route_key == "teacher"
  assert specs[1].data_files == ("a.jsonl",)
  # Single-teacher mode ignores route keys entirely.
  assert specs[0].teacher_for({"teacher": "nonsense"}).name == "math"
  assert specs[1].teacher_for({"teacher": "chem"}).name == "chem"
  # The same teacher used by two datasets is one teacher (test_train checks that teachers on one base model
  # share its weights).
  assert [t.name for t in T.all_teachers(specs)] == ["math", "chem"]


def test_dataset_config_errors():
  with pytest.raises(T.TeacherConfigError, match="exactly one of 'teacher'"):
    T.dataset_teachers_from_dict({"dataset": "d", "groups_per_batch": 1, "teacher": "/a", "teachers": ["/b"]})
  with pytest.raises(T.TeacherConfigError, match=r"datasets\[0\]\.route_key: only meaningful"):
    T.dataset_teachers_from_dict({"dataset": "d", "groups_per_batch": 1, "teacher": "/a", "route_key": "k"})
  with pytest.raises(T.TeacherConfigError, match=r"datasets\[0\]\.group_per_batch: unknown key; did you mean "
                                                 r"'groups_per_batch'"):
    T.dataset_teachers_from_dict({"dataset": "d", "group_per_batch": 1, "teacher": "/a"})
  # One name, two different configs: refused rather than silently scoring with whichever came first.
  with pytest.raises(T.TeacherConfigError, match="teacher name 't' is used by datasets\\[0\\]"):
    T.parse_datasets([{"dataset": "a", "groups_per_batch": 1, "teacher": {"model_path": "/a", "name": "t"}},
                      {"dataset": "b", "groups_per_batch": 1, "teacher": {"model_path": "/b", "name": "t"}}])


# ------------------------------------------------------------------------------------------- routing

ROUTED = T.parse_teachers([{"model_path": "/m", "route_value": "math"},
                           {"model_path": "/m", "route_value": "arithmetic", "checkpoint_path": "/lora"},
                           {"model_path": "Qwen/Qwen3-32B"}])


def test_route_exact_match_and_model_name_default():
  assert T.route({"teacher": "arithmetic"}, ROUTED).checkpoint_path == "/lora"
  assert T.route({"teacher": "math"}, ROUTED).name == "math"
  assert T.route({"who": "Qwen/Qwen3-32B"}, ROUTED, "who").model_path == "Qwen/Qwen3-32B"


@pytest.mark.parametrize("row, reason, fragment", [
    ({"messages": []}, "missing_route", "expected one of 'math'"),
    ({"teacher": None}, "missing_route", "no 'teacher' value"),
    ({"teacher": 3}, "route_not_string", "int 3"),
    ({"teacher": ["math"]}, "route_not_string", "list"),
    ({"teacher": "Math"}, "unknown_route", "did you mean 'math'"),  # exact match only
    ({"teacher": "math "}, "unknown_route", "'math '"),
])
def test_route_errors(row, reason, fragment):
  with pytest.raises(RowError) as e:
    T.route(row, ROUTED, "teacher")
  assert e.value.reason == reason and e.value.field == "teacher" and fragment in e.value.message


# ------------------------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok_a")
  train_tokenizer(TEXTS_A, 300, out_dir=out)
  return out


def _load(path) -> transformers.PreTrainedTokenizerBase:
  return transformers.AutoTokenizer.from_pretrained(str(path))


def test_same_tokenizer_passes(tok_dir):
  T.check_tokenizers(_load(tok_dir), _load(tok_dir), "twin")
  backend = _load(tok_dir).backend_tokenizer  # raw `tokenizers.Tokenizer`s are accepted too
  T.check_tokenizers(backend, tokenizers.Tokenizer.from_str(backend.to_str()), "raw")


def test_different_vocab_names_first_differing_ids(tok_dir):
  student, teacher = _load(tok_dir), train_tokenizer(TEXTS_B, 300)
  s_by_id = {i: s for s, i in student.get_vocab().items()}
  t_by_id = {i: s for s, i in teacher.get_vocab().items()}
  first = min(i for i in s_by_id if s_by_id[i] != t_by_id.get(i))
  with pytest.raises(T.TokenizerMismatchError) as e:
    T.check_tokenizers(student, teacher, "other")
  msg = str(e.value)
  assert "teacher 'other'" in msg
  assert f"id {first}: student {s_by_id[first]!r} vs teacher {t_by_id.get(first, '<none>')!r}" in msg


def test_swapped_ids_with_same_token_set_are_refused(tok_dir, tmp_path):
  """Same tokens, same name, same size: only a token -> id comparison sees this."""
  raw = json.loads(_load(tok_dir).backend_tokenizer.to_str())
  vocab = raw["model"]["vocab"]
  a, b = "a", "b"
  vocab[a], vocab[b] = vocab[b], vocab[a]
  teacher = tokenizers.Tokenizer.from_str(json.dumps(raw))
  with pytest.raises(T.TokenizerMismatchError) as e:
    T.check_tokenizers(_load(tok_dir).backend_tokenizer, teacher, "swapped")
  lo = min(vocab[a], vocab[b])
  assert f"id {lo}:" in str(e.value) and "differ at 2 ids" in str(e.value)


def test_special_token_roles_and_template_tokens(tok_dir):
  student, teacher = _load(tok_dir), _load(tok_dir)
  teacher.eos_token = "<|endoftext|>"  # a base-model teacher whose eos is not the chat turn end
  with pytest.raises(T.TokenizerMismatchError, match=r"eos_token: student '<\|im_end\|>' \(id \d+\) vs teacher "
                                                     r"'<\|endoftext\|>'"):
    T.check_tokenizers(student, teacher, "base")
  T.check_tokenizers(student, teacher, "base", ignore_roles=("eos",))
  with pytest.raises(ValueError, match="ignore_roles"):
    T.check_tokenizers(student, teacher, "base", ignore_roles=("eso",))
  # A teacher chat template writing a special token the vocabularies do not have would be split into bytes.
  teacher = _load(tok_dir)
  teacher.chat_template = teacher.chat_template.replace("<|im_start|>", "<|im_sep|>")
  with pytest.raises(T.TokenizerMismatchError, match=r"chat-template token '<\|im_sep\|>'"):
    T.check_tokenizers(student, teacher, "templ")


# ------------------------------------------------------------------------------------------- environment

def test_env_parsing_precedence_and_legacy():
  env = {"DISTILLATION_TEACHERS": " /ckpt/math , Qwen/Qwen3-32B", "OPD_TEACHERS": "/ignored",
         "OPD_TEACHER_ROUTE_KEY": "expert"}
  parsed = T.teachers_from_env(env)
  assert parsed.source == "DISTILLATION_TEACHERS" and parsed.route_key == "expert"
  assert [t.route_value for t in T.parse_teachers(parsed.teachers)] == ["/ckpt/math", "Qwen/Qwen3-32B"]
  legacy = T.teachers_from_env({"OPD_TEACHERS": "/a", "DISTILLATION_TEACHER_ROUTE_KEY": "k",
                                "OPD_TEACHER_ROUTE_KEY": "old"})
  assert legacy.teachers == [{"model_path": "/a"}] and legacy.route_key == "k"
  assert T.teachers_from_env({}) == (None, None, None)
  with pytest.raises(T.TeacherConfigError, match=r"\$DISTILLATION_TEACHERS: empty entry"):
    T.teachers_from_env({"DISTILLATION_TEACHERS": "/a,,/b"})


def test_from_run_config_all_three_modes():
  from jopd import config as run_config
  c = run_config.opd()
  c.teacher_model, c.teacher_checkpoint, c.groups_per_batch = "/t", "", 8
  (single,) = T.dataset_teachers_from_config(c)
  # "" = unset; a single teacher is named "teacher" in metrics whatever its path
  assert single.route_key is None and single.teachers == (T.TeacherConfig("teacher", "/t"),)
  assert single.dataset == c.dataset and single.groups_per_batch == 8 and single.data_files is None
  c.teachers = [{"model_path": "/t", "route_value": "math", "checkpoint_path": ""},
                {"model_path": "/u", "route_value": "chem"}]
  c.route_key = "expert"
  (routed,) = T.dataset_teachers_from_config(c)
  assert routed.route_key == "expert" and routed.teacher_for({"expert": "chem"}).model_path == "/u"
  c.datasets = [{"dataset": "deepmath", "groups_per_batch": 2, "teacher": {"model_path": "/t"}, "data_files": ""}]
  with pytest.raises(T.TeacherConfigError, match="config.teachers: set either config.datasets"):
    T.dataset_teachers_from_config(c)
  c.teachers = []
  assert T.dataset_teachers_from_config(c)[0].dataset == "deepmath"
  c.datasets, c.teacher_model = [], ""
  with pytest.raises(T.TeacherConfigError, match="config.teacher_model: expected a teacher model path"):
    T.dataset_teachers_from_config(c)


def test_routed_config_takes_teachers_and_route_key_from_the_environment(monkeypatch):
  import importlib.util
  spec = importlib.util.spec_from_file_location("routed_cfg", os.path.join(REPO, "configs", "routed.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for var in T.TEACHERS_ENV + T.ROUTE_KEY_ENV:
    monkeypatch.delenv(var, raising=False)
  default = module.get_config()
  assert [t["route_value"] for t in default.teachers] == ["math-teacher", "arithmetic-teacher"]
  assert default.route_key == "teacher"
  monkeypatch.setenv("DISTILLATION_TEACHERS", "/ckpts/a, /ckpts/b")
  monkeypatch.setenv("DISTILLATION_TEACHER_ROUTE_KEY", "expert")
  c = module.get_config()
  assert [t["model_path"] for t in c.teachers] == ["/ckpts/a", "/ckpts/b"]
  assert c.route_key == "expert"
  # Each path is its own route value (its model name when route_value is unset).
  specs = T.dataset_teachers_from_config(c)
  assert specs[0].teacher_for({"expert": "/ckpts/b"}).model_path == "/ckpts/b"
