"""A corpus of malformed inputs (rows, files, config values, teacher configs, model and tokenizer directories,
checkpoints, command-line typos): each is refused or counted with the message docs/errors.md documents, raised by
jopd's own validation before any jitted function runs; and loading never executes code from a checkpoint.

Most cases call the validating functions in-process; a few run the CLI to check what a user sees.
"""
import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jopd import checkpoint, cli, runtime
from jopd import config as config_lib
from jopd import mesh as mesh_lib
from jopd import teachers as teachers_lib
from jopd.data import builders
from jopd.data import pipeline as pipeline_lib
from jopd.data.rows import RowError, SkipCounter
from tests import data_utils, tiny_world
from tests.data_utils import user

REPO = pathlib.Path(tiny_world.REPO)
ERRORS_MD = (REPO / "docs" / "errors.md").read_text()


def _documented(substring: str) -> None:
  """Every message a test pins is listed in docs/errors.md (messages with values elided to their fixed part)."""
  assert substring in ERRORS_MD, f"docs/errors.md does not document {substring!r}"


def _refused_by_jopd(excinfo) -> None:
  """Raised on purpose by jopd/ or models/ code, not from inside jax (cli.is_refusal: one line, exit 2)."""
  assert cli.is_refusal(excinfo.value), excinfo.getrepr(style="short")


@pytest.fixture(scope="module")
def tok():
  return data_utils.tiny_tokenizer()


# ============================================================================================ rows

GOOD = {"messages": [user("What is 1 + 2?")], "teacher": "alpha"}


def _row(**fields):
  return {"messages": [user("What is 2 + 3?")], "teacher": "alpha", **fields}


# (JSONL line, reason counted under data/skipped/<reason>, field named, fixed part of the message)
ROWS = [
    pytest.param('{"messages": [', "bad_json", "<line>", "not JSON (", id="truncated-json"),
    pytest.param("{'messages': []}", "bad_json", "<line>", "not JSON (", id="python-dict-not-json"),
    pytest.param(b'{"messages": [{"role": "user", "content": "caf\xe9"}], "teacher": "alpha"}', "bad_encoding",
                 "<line>", "not UTF-8 (", id="latin1-bytes"),
    pytest.param('{"messages": [{"role": "user", "content": "\\ud83d ok"}], "teacher": "alpha"}', "bad_encoding",
                 "messages[0].content", "lone UTF-16 surrogate", id="lone-surrogate"),
    pytest.param([1, 2], "bad_type", "<row>", "expected a JSON object, got list", id="row-is-list"),
    pytest.param("null", "bad_type", "<row>", "expected a JSON object, got NoneType", id="row-is-null"),
    pytest.param({"prompt": "x", "teacher": "alpha"}, "missing_messages", "messages", "no 'messages'",
                 id="no-messages"),
    pytest.param(_row(messages="What is 2 + 3?"), "bad_type", "messages",
                 "expected a list of {role, content} objects, got str", id="messages-is-string"),
    pytest.param(_row(messages=["What is 2 + 3?"]), "bad_type", "messages[0]",
                 "expected a {role, content} object, got str", id="message-is-string"),
    pytest.param(_row(messages=[{"role": "robot", "content": "x"}]), "bad_role", "messages[0].role",
                 "is not one of system/user/assistant", id="unknown-role"),
    pytest.param(_row(messages=[{"content": "x"}]), "bad_role", "messages[0].role",
                 "role None is not one of system/user/assistant", id="missing-role"),
    pytest.param(_row(messages=[user(7)]), "bad_type", "messages[0].content", "expected a string, got int",
                 id="content-is-int"),
    pytest.param(_row(messages=[user([{"type": "text", "text": "hi"}])]), "bad_type", "messages[0].content",
                 "expected a string, got list", id="content-is-parts-list"),
    pytest.param(_row(messages=[user(" \n ")]), "empty_content", "messages[0].content", "content is empty",
                 id="blank-content"),
    pytest.param(_row(messages=[]), "empty_messages", "messages",
                 "no messages; expected at least one system/user message", id="empty-messages"),
    pytest.param(_row(messages=[{"role": "assistant", "content": "4"}]), "empty_messages", "messages",
                 "only assistant messages", id="only-assistant"),
    pytest.param(_row(expected_answer=5), "bad_type", "expected_answer", "expected a string, got int",
                 id="answer-is-int"),
    pytest.param(_row(teacher_messages=[{"role": "oracle", "content": "x"}]), "bad_role",
                 "teacher_messages[0].role", "is not one of system/user/assistant", id="bad-teacher-messages"),
    pytest.param(_row(messages=[user("What is 1 + 2? " * 40)]), "prompt_too_long", "messages",
                 "tokens once rendered; max_prompt_tokens=64", id="prompt-too-long"),
    pytest.param({"messages": [user("x")]}, "missing_route", "teacher", "row has no 'teacher' value; expected one of",
                 id="missing-route"),
    pytest.param(_row(teacher=None), "missing_route", "teacher", "row has no 'teacher' value; expected one of",
                 id="null-route"),
    pytest.param(_row(teacher=3), "route_not_string", "teacher", "'teacher' is int 3; expected a string",
                 id="route-is-int"),
    pytest.param(_row(teacher="alpah"), "unknown_route", "teacher",
                 "matches no teacher's route_value (did you mean 'alpha'?)", id="route-typo"),
]

ROUTED = teachers_lib.DatasetTeachers(
    "rows.jsonl", 1, (teachers_lib.TeacherConfig("alpha", "/m/a", route_value="alpha"),
                      teachers_lib.TeacherConfig("beta", "/m/b", route_value="beta")), route_key="teacher")


def _prepare(path, tok, strict=False):
  counter = SkipCounter(strict=strict)
  examples = pipeline_lib.prepare_examples(builders.read_records(path), tokenizer=tok, counter=counter,
                                           max_prompt_tokens=64, route=lambda row: ROUTED.teacher_for(row).name)
  return examples, counter


@pytest.mark.parametrize("line,reason,field,message", ROWS)
def test_bad_row_is_counted_or_refused_with_file_line_and_field(tmp_path, tok, line, reason, field, message):
  path = data_utils.write_jsonl(tmp_path / "rows.jsonl", [GOOD, line, GOOD])
  examples, counter = _prepare(path, tok)
  assert [e["where"] for e in examples] == [f"{path}:1", f"{path}:3"]
  assert dict(counter.counts) == {reason: 1}  # never dropped silently: counted under its reason
  with pytest.raises(RowError) as excinfo:
    _prepare(path, tok, strict=True)
  text = str(excinfo.value)
  assert text.startswith(f"{path}:2: field {field!r}: ") and message in text and text.endswith(f"[{reason}]"), text
  _refused_by_jopd(excinfo)
  _documented(f"`{reason}`")
  _documented(message)


def test_harmless_oddities_are_accepted(tmp_path, tok):
  """A byte-order mark, CRLF line ends, blank lines and a NUL character are not errors."""
  path = tmp_path / "odd.jsonl"
  good = json.dumps(GOOD).encode()
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + json.dumps(_row(messages=[user("a\x00b")])).encode()
                   + b"\r\n")
  examples, counter = _prepare(str(path), tok)
  assert len(examples) == 2 and counter.total == 0


# ============================================================================================ data files

def _file_case(tmp_path, kind):
  if kind == "missing":
    return str(tmp_path / "nope.jsonl")
  if kind == "directory":
    os.makedirs(tmp_path / "dir.jsonl")
    return str(tmp_path / "dir.jsonl")
  if kind == "empty":
    return data_utils.write_jsonl(tmp_path / "empty.jsonl", [])
  if kind == "all-bad":
    return data_utils.write_jsonl(tmp_path / "bad.jsonl", ["{", [1], {"messages": []}])
  raise AssertionError(kind)


@pytest.mark.parametrize("kind,error,message", [
    ("missing", FileNotFoundError, "cannot read it (No such file or directory); expected a readable JSONL file"),
    ("directory", IsADirectoryError, "cannot read it (Is a directory); expected a readable JSONL file"),
    ("empty", ValueError, "has 0 usable rows: 0 per process for 1 processes, fewer than groups_per_batch=2"),
    ("all-bad", ValueError, "has 0 usable rows: 0 per process for 1 processes, fewer than groups_per_batch=2"),
])
def test_unusable_data_file_is_refused_naming_it(tmp_path, tok, kind, error, message):
  path = _file_case(tmp_path, kind)
  counter = SkipCounter()
  with pytest.raises(error) as excinfo:
    examples = pipeline_lib.load_examples(path, tokenizer=tok, counter=counter)
    pipeline_lib.Pipeline(examples, groups_per_batch=2, name=path)
  assert path in str(excinfo.value) and message in str(excinfo.value), str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented("cannot read it" if "cannot" in message else "usable rows")
  if kind == "all-bad":
    assert counter.total == 3  # the rows were counted before the file was refused


def test_dataset_field_that_is_neither_builder_nor_file_is_refused():
  with pytest.raises(ValueError, match="is neither a builder") as excinfo:
    list(builders.read_records("prompts.json"))
  _refused_by_jopd(excinfo)
  _documented("is neither a builder")


def test_builder_row_missing_its_source_column_is_counted(tmp_path, tok):
  path = data_utils.write_jsonl(tmp_path / "deepmath.jsonl", [{"question": "What is 1 + 2?", "final_answer": "3"},
                                                               {"problem": "renamed column"}])
  counter = SkipCounter()
  examples = pipeline_lib.load_examples("deepmath", tokenizer=tok, counter=counter, data_files=path)
  assert len(examples) == 1 and dict(counter.counts) == {"missing_field": 1}
  _documented("`missing_field`")


# ============================================================================================ config values

@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", -1e-4, "--config.learning_rate=-0.0001: expected a number >= 0"),
    ("kl_discount_factor", -1.0, "--config.kl_discount_factor=-1.0: expected a number in [0, 1]"),
    ("loss_normalization", "mean", "--config.loss_normalization='mean': expected one of 'sum', 'token_mean'"),
    ("num_substeps", 0, "--config.num_substeps=0: expected an integer >= 1"),
    ("group_size", 0, "--config.group_size=0: expected an integer >= 1"),
    ("temperature", 0.0, "--config.temperature=0.0: expected a number > 0"),
    ("top_p", 1.5, "--config.top_p=1.5: expected a number in (0, 1]"),
    ("param_dtype", "fp8", "--config.param_dtype='fp8': expected one of 'bfloat16', 'float32', 'float16'"),
    ("learning_rate", float("nan"), "--config.learning_rate=nan: expected a number >= 0"),
])
def test_bad_config_value_is_refused_before_anything_loads(field, value, message):
  c = config_lib.opd()
  c[field] = value
  with pytest.raises(ValueError) as excinfo:
    cli.check_config(c)
  assert str(excinfo.value).startswith(message), str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented("`--config.<field>=<value>: expected <what is accepted>`")


def test_every_shipped_config_passes_the_value_checks():
  import importlib.util
  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli.check_config(module.get_config())


@pytest.mark.parametrize("fields,message", [
    ({"teachers": [{"base_model": "/m/a"}]}, "config.teachers[0].base_model: unknown key; did you mean 'model_path'?"),
    ({"teachers": [{"model_path": "/m/a"}, {"model_path": "/m/a"}]},
     "config.teachers[1].route_value: '/m/a' is also the route_value of config.teachers[0]"),
    ({"teachers": [{"model_path": "/m/a"}], "datasets": [{"dataset": "x.jsonl"}]}, "not both"),
    ({"teacher_model": ""}, "config.teacher_model: expected a teacher model path or name"),
    ({"groups_per_batch": 0}, "config.groups_per_batch: expected a positive integer, got 0"),
    ({"teachers": [{"model_path": "/m/a", "route_value": 3}]}, "config.teachers[0].route_value: expected None or a "
     "non-empty string, got 3"),
])
def test_bad_teacher_config_is_refused_naming_the_field(fields, message):
  c = config_lib.opd()
  c.dataset = "rows.jsonl"
  for k, v in fields.items():
    c[k] = v
  with pytest.raises(teachers_lib.TeacherConfigError) as excinfo:
    teachers_lib.dataset_teachers_from_config(c)
  assert message in str(excinfo.value), str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented("jopd/teachers.py: ")


# ============================================================================================ model directories

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
  path, _, _ = tiny_world.make_model(tmp_path_factory.mktemp("model") / "student", tok, seed=0)
  return path


def _edit_json(path, **fields):
  data = json.loads(pathlib.Path(path).read_text())
  data.update(fields)
  pathlib.Path(path).write_text(json.dumps(data))


def _rewrite_weights(directory, edit):
  file = os.path.join(directory, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def _truncate(file, keep):
  data = pathlib.Path(file).read_bytes()
  pathlib.Path(file).write_bytes(data[:keep(len(data))])


def _sharded_index_missing_shard(d):
  os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00002.safetensors"))
  names = load_file(os.path.join(d, "model-00001-of-00002.safetensors")).keys()
  index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
  index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
  pathlib.Path(d, "model.safetensors.index.json").write_text(json.dumps(index))


def _bin_only(d):
  os.remove(os.path.join(d, "model.safetensors"))
  pathlib.Path(d, "pytorch_model.bin").write_bytes(b"not read")


MODEL_CASES = [
    pytest.param(lambda d: os.remove(os.path.join(d, "config.json")), FileNotFoundError,
                 "no config.json (expected a transformers checkpoint directory)", id="no-config-json"),
    pytest.param(lambda d: _edit_json(os.path.join(d, "config.json"), model_type="llama"), ValueError,
                 "field 'model_type': got 'llama', expected 'qwen3'", id="not-qwen3"),
    pytest.param(lambda d: _truncate(os.path.join(d, "model.safetensors"), lambda n: n // 2), ValueError,
                 "not a readable safetensors file", id="truncated-safetensors"),
    pytest.param(lambda d: _truncate(os.path.join(d, "model.safetensors"), lambda n: 0), ValueError,
                 "not a readable safetensors file", id="empty-safetensors"),
    pytest.param(lambda d: os.remove(os.path.join(d, "model.safetensors")), ValueError,
                 "no model.safetensors, model.safetensors.index.json or other *.safetensors file", id="no-weights"),
    pytest.param(_bin_only, ValueError, "jopd loads safetensors only and never unpickles a checkpoint; convert it",
                 id="pytorch-bin-only"),
    pytest.param(lambda d: _edit_json(os.path.join(d, "config.json"), vocab_size=500), ValueError,
                 "tensor 'model.embed_tokens.weight' has shape", id="wrong-tensor-shape"),
    pytest.param(lambda d: _rewrite_weights(d, lambda t: t.pop("model.norm.weight")), ValueError,
                 "missing tensor 'model.norm.weight'", id="missing-tensor"),
    pytest.param(lambda d: _rewrite_weights(d, lambda t: t.update(extra=np.zeros(2, np.float32))), ValueError,
                 "unexpected tensor 'extra'", id="unexpected-tensor"),
    pytest.param(_sharded_index_missing_shard, ValueError, "model-00002-of-00002.safetensors, which does not exist",
                 id="index-names-missing-shard"),
    pytest.param(lambda d: pathlib.Path(d, "config.json").write_text("{oops"), ValueError,
                 "config.json: not valid JSON", id="config-json-not-json"),
    pytest.param(lambda d: pathlib.Path(d, "tokenizer.json").write_text("{oops"), ValueError,
                 "the tokenizer could not be loaded", id="tokenizer-json-not-json"),
    pytest.param(lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d) if f.startswith(("tokenizer",
                                                                                                 "chat_template"))],
                 ValueError, "no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json)",
                 id="no-tokenizer-files"),
]


@pytest.fixture(scope="module")
def load_env():
  c = config_lib.opd()
  c.param_dtype, c.remat = "float32", "none"
  return c, mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("corrupt,error,message", MODEL_CASES)
def test_bad_model_directory_is_refused_naming_file_and_tensor(model_dir, tmp_path, load_env, corrupt, error,
                                                                message):
  path = str(tmp_path / "model")
  shutil.copytree(model_dir, path)
  corrupt(path)
  c, mesh = load_env
  with pytest.raises(error) as excinfo:
    runtime.load_model(path, c, mesh)
  assert path in str(excinfo.value) and message in str(excinfo.value), str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented(message)


@pytest.mark.parametrize("name,message", [
    ("/nonexistent/models/student", "no such directory (expected a transformers checkpoint directory)"),
    ("/nonexistent", "no such directory (expected a transformers checkpoint directory)"),
    ("not-a-hub/name/either", "not a directory and not a hub name like 'Qwen/Qwen3-8B'"),
    ("gs://bucket/models/student", "copy gs:// model weights to local disk first"),
    ("Qwen/NotCachedHere", "not in the local Hugging Face cache and could not be downloaded"),
])
def test_missing_model_is_refused_naming_the_config_field(name, message, load_env):
  c, mesh = load_env
  with pytest.raises(FileNotFoundError if "gs://" not in name else ValueError) as excinfo:
    runtime.load_model(name, c, mesh)
  assert str(excinfo.value).startswith(f"--config.model_name={name!r}: ") and message in str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented(message)


def test_teacher_with_another_tokenizer_is_refused_naming_differing_ids(tok):
  other = data_utils.tokenizer_lib.train_tokenizer(["zebra quartz jumps"] * 5, vocab_size=len(tok))
  with pytest.raises(teachers_lib.TokenizerMismatchError) as excinfo:
    teachers_lib.check_tokenizers(tok, other, "t1")
  assert "teacher 't1': its tokenizer is incompatible with the student's" in str(excinfo.value)
  assert re.search(r"id \d+: student '.*' vs teacher '.*'", str(excinfo.value))
  _refused_by_jopd(excinfo)
  _documented("its tokenizer is incompatible with the student's")


# ============================================================================================ checkpoints

@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(1, {"trainable": {"a": jnp.zeros(4)}}, meta={"lora_rank": 4})
  return directory


def test_checkpoint_path_without_a_finished_checkpoint_is_refused(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError) as excinfo:
    checkpoint.load_trainable(tmp_path / "empty")
  assert "no finished checkpoint to restore" in str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented("no finished checkpoint to restore")


@pytest.mark.parametrize("abstract,message,doc", [
    ({"trainable": {"b": jax.ShapeDtypeStruct((4,), jnp.float32)}},
     "tensor 'trainable/a' is saved but not in abstract_state", "is saved but not in abstract_state"),
    ({"trainable": {"a": jax.ShapeDtypeStruct((8,), jnp.float32)}},
     "tensor 'trainable/a' was saved as float32[4], abstract_state asks for float32[8]", "abstract_state asks for"),
])
def test_resume_with_another_trainable_tree_names_the_tensor(saved_checkpoint, abstract, message, doc):
  with checkpoint.Checkpointer(saved_checkpoint, read_only=True) as ckpt:
    with pytest.raises(ValueError) as excinfo:
      ckpt.restore(1, abstract_state=abstract)
  assert message in str(excinfo.value), str(excinfo.value)
  _refused_by_jopd(excinfo)
  _documented(doc)


_TORN_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from jopd import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1])
ckpt.save(1, {"trainable": {"a": jnp.zeros(4)}})
ckpt.wait()
ckpt.save(2, {"trainable": {"a": jnp.ones((512, 1024))}})  # the write continues in the background ...
os.kill(os.getpid(), signal.SIGKILL)  # ... and is killed
"""


def test_save_killed_mid_write_is_never_the_latest_checkpoint(tmp_path):
  """SIGKILL during an asynchronous save leaves orbax's temporary directory: never a step, never restored, and
  the step is saved again cleanly by the resumed run."""
  directory = tmp_path / "checkpoints"
  proc = subprocess.run([sys.executable, "-c", _TORN_SAVE, str(directory)], cwd=REPO, capture_output=True,
                        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, timeout=120)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert "2.orbax-checkpoint-tmp" in os.listdir(directory)
  with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(2, {"trainable": {"a": jnp.full(4, 2.0)}})
    np.testing.assert_array_equal(ckpt.restore(2)[0]["trainable"]["a"], np.full(4, 2.0))
    assert ckpt.all_steps() == [1, 2]


# ============================================================================================ security

def _evil_pickle(marker) -> bytes:
  """A pickle that creates `marker` when unpickled (what a malicious pytorch_model.bin does)."""
  import pickle

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))
  return pickle.dumps(Payload())


def test_pickle_checkpoint_is_refused_unread_with_a_conversion_hint(model_dir, tmp_path, load_env):
  path = tmp_path / "bin_only"
  shutil.copytree(model_dir, path)
  os.remove(path / "model.safetensors")
  marker = tmp_path / "code_ran"
  (path / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
  c, mesh = load_env
  with pytest.raises(ValueError) as excinfo:
    runtime.load_model(str(path), c, mesh)
  assert "only pytorch_model.bin found" in str(excinfo.value)
  assert "save_pretrained(out, safe_serialization=True)" in str(excinfo.value)  # says how to convert
  assert not marker.exists()


def test_remote_code_in_a_model_directory_is_never_imported(model_dir, tmp_path):
  """A tokenizer_config.json / config.json whose auto_map points at a Python file in the directory: the file is
  not imported (transformers' trust_remote_code stays False)."""
  path = tmp_path / "remote_code"
  shutil.copytree(model_dir, path)
  marker = tmp_path / "code_ran"
  (path / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
  _edit_json(path / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]},
             tokenizer_class="EvilTokenizer")
  _edit_json(path / "config.json", auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
  try:
    runtime.load_tokenizer(str(path))
  except Exception:  # refusing is fine too; running the file is not
    pass
  assert not marker.exists()


_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _unsafe_calls(tree: ast.AST):
  """(node, why) for every construct that could execute code from a checkpoint or dataset."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
      for name in names:
        if name and name.split(".")[0] in _UNSAFE_MODULES:
          yield node, f"imports {name} (unpickling runs code)"
    if not isinstance(node, ast.Call):
      continue
    func = ast.unparse(node.func)
    if func in ("eval", "exec") or func.endswith(("torch.load", "pickle.load", "pickle.loads")):
      yield node, f"calls {func}"
    if func.endswith(".from_pretrained") and not re.search(r"Tokenizer|Config", func):
      yield node, f"calls {func} (may unpickle torch weights; load safetensors with models/hf.py)"
    for kw in node.keywords:
      if kw.arg in ("trust_remote_code", "allow_pickle") and not (isinstance(kw.value, ast.Constant) and
                                                                  kw.value.value is False):
        yield node, f"passes {kw.arg}={ast.unparse(kw.value)}"


def test_no_code_path_unpickles_or_runs_remote_code():
  """Over the code (not strings or comments) of jopd/ and models/: no pickle-family import, torch.load, eval/exec,
  model from_pretrained, trust_remote_code or allow_pickle. The checker itself is checked on a bad snippet."""
  bad = ("import pickle\nfrom dill import loads\nw = torch.load(f)\nm = AutoModelForCausalLM.from_pretrained(p)\n"
         "t = AutoTokenizer.from_pretrained(p, trust_remote_code=True)\nx = np.load(f, allow_pickle=True)\n"
         "eval(s)\n")
  assert len(list(_unsafe_calls(ast.parse(bad)))) == 7
  sources = sorted(p for d in ("jopd", "models") for p in (REPO / d).rglob("*.py"))
  assert len(sources) > 10
  found = [f"{path}:{node.lineno}: {why}" for path in sources
           for node, why in _unsafe_calls(ast.parse(path.read_text()))]
  assert not found, found


def test_an_error_inside_a_jitted_function_is_a_bug_not_a_refusal():
  """What `_refused_by_jopd` relies on: the same ValueError of jopd/losses.py is a refusal when raised on the host
  and a bug (full traceback, exit 1) when raised while jax traces a jitted function."""
  x, mask = jnp.zeros((1, 2)), jnp.ones((1, 2), bool)
  from jopd import losses
  with pytest.raises(ValueError, match="loss_normalization='mean'") as host:
    losses.importance_sampling_loss(x, x, x, mask, None, "mean")
  assert cli.is_refusal(host.value)
  with pytest.raises(ValueError, match="loss_normalization='mean'") as traced:
    jax.jit(lambda a, m: losses.importance_sampling_loss(a, a, a, m, None, "mean"))(x, mask)
  assert not cli.is_refusal(traced.value)


# ============================================================================================ command line

def _cli(args, wrapped: bool, timeout=300):
  """`python -m jopd.train ARGS`, or through `jopd.cli.run` (what train.py's main will call)."""
  entry = (["-c", "from jopd import cli, train; cli.run(train.main)"] if wrapped else ["-m", "jopd.train"])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, *entry, f"--config={REPO}/configs/tiny_opd.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if not re.match(r"^[IWE]\d{4} ", line)]  # absl log lines aside


def test_config_typo_is_refused_with_the_closest_field():
  proc = _cli(["--config.learing_rate=1e-3"], wrapped=False)  # python -m jopd.train itself
  assert proc.returncode == cli.USAGE_EXIT_CODE
  assert _errors(proc.stderr) == [f"jopd.train: error: --config.learing_rate: no such field in "
                                  f"{REPO}/configs/tiny_opd.py; did you mean --config.learning_rate?"], proc.stderr
  proc = _cli(["--config.learing_rate=1e-3"], wrapped=True)
  assert proc.returncode == cli.USAGE_EXIT_CODE == 2
  assert _errors(proc.stderr) == [f"jopd: error: --config.learing_rate: no such field in {REPO}/configs/tiny_opd.py; "
                                  "did you mean --config.learning_rate?"], proc.stderr
  _documented("no such field in")


def test_cli_reports_a_bad_checkpoint_in_one_line_and_exits_2(model_dir, tmp_path):
  path = tmp_path / "truncated"
  shutil.copytree(model_dir, path)
  _truncate(path / "model.safetensors", lambda n: n - 100)
  proc = _cli([f"--config.model_name={path}", f"--config.teacher_model={path}", "--config.dataset=x.jsonl",
               f"--config.log_path={tmp_path / 'run'}"], wrapped=True)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = _errors(proc.stderr)
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[0].startswith(f"jopd: error: {path}/model.safetensors: not a readable safetensors file")
