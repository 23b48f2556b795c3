"""Teacher configuration: validated teacher and per-dataset configs, routing a row to its one teacher, grouping
teachers that share base weights, the student/teacher tokenizer compatibility check, and env-var parsing.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Collection, Mapping, NamedTuple, Sequence

from jopd.data import rows
from jopd.data.rows import RowError

DEFAULT_ROUTE_KEY = "teacher"
DEFAULT_TEACHER_MESSAGES_KEY = rows.DEFAULT_TEACHER_MESSAGES_KEY
TEACHERS_ENV = ("DISTILLATION_TEACHERS", "OPD_TEACHERS")  # preferred name first, legacy fallback second
ROUTE_KEY_ENV = ("DISTILLATION_TEACHER_ROUTE_KEY", "OPD_TEACHER_ROUTE_KEY")
_HERE = "jopd/teachers.py"
# Field names of the reference recipes, so a config written for them gets pointed at ours.
_REFERENCE_NAMES = {"base_model": "model_path", "model": "model_path", "teacher_model": "model_path",
                    "load_checkpoint_path": "checkpoint_path", "tokenizer_model": "tokenizer_path"}


class TeacherConfigError(ValueError):
  """A teacher or dataset config field is missing, mistyped or inconsistent."""


class TokenizerMismatchError(ValueError):
  """A teacher's tokenizer does not give the student's token ids the same meaning."""


def _fail(where: str, message: str):
  raise TeacherConfigError(f"{_HERE}: {where}: {message}")


def _check_str(value: Any, where: str, what: str, optional: bool = False) -> str | None:
  if value is None and optional:
    return None
  if not isinstance(value, str) or not value.strip():
    _fail(where, f"expected {what}, got {value!r}")
  return value


def _validate_teacher_fields(fields: Mapping[str, Any], where: str, name_optional: bool = False):
  _check_str(fields.get("model_path"), f"{where}.model_path", "a non-empty string: a local directory, gs:// path "
             "or Hugging Face model name")
  _check_str(fields.get("name"), f"{where}.name", "a non-empty string (it names the teacher's metrics)",
             optional=name_optional)
  _check_str(fields.get("checkpoint_path"), f"{where}.checkpoint_path", "None or a non-empty string: a jopd "
             "checkpoint or PEFT adapter directory", optional=True)
  _check_str(fields.get("tokenizer_path"), f"{where}.tokenizer_path", "None or a non-empty string", optional=True)
  _check_str(fields.get("route_value"), f"{where}.route_value", "None or a non-empty string", optional=True)
  _check_str(fields.get("teacher_messages_key", DEFAULT_TEACHER_MESSAGES_KEY), f"{where}.teacher_messages_key",
             "a non-empty row key")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """A frozen teacher. `tokenizer_path` defaults to `model_path`; `route_value` (the value a row's route key
  must equal) defaults to `model_path`. `checkpoint_path` is a jopd orbax checkpoint or a PEFT adapter dir."""
  name: str
  model_path: str
  checkpoint_path: str | None = None
  tokenizer_path: str | None = None
  route_value: str | None = None
  teacher_messages_key: str = DEFAULT_TEACHER_MESSAGES_KEY

  def __post_init__(self):
    name_ok = isinstance(self.name, str) and self.name.strip()
    _validate_teacher_fields(dataclasses.asdict(self), f"teacher {self.name!r}" if name_ok else "teacher")
    # Resolve defaults once so every reader sees the effective values.
    if self.tokenizer_path is None:
      object.__setattr__(self, "tokenizer_path", self.model_path)
    if self.route_value is None:
      object.__setattr__(self, "route_value", self.model_path)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_TEACHER_KEYS = tuple(f.name for f in dataclasses.fields(TeacherConfig))


@dataclasses.dataclass(frozen=True)
class DatasetTeachers:
  """One data source and the teachers that score its rows: a single teacher (`route_key` None) scores every row;
  otherwise each row goes to the teacher whose `route_value` equals `row[route_key]`."""
  dataset: str
  groups_per_batch: int
  teachers: tuple[TeacherConfig, ...]
  route_key: str | None = None
  data_files: str | tuple[str, ...] | None = None

  def teacher_for(self, row: Mapping[str, Any]) -> TeacherConfig:
    if self.route_key is None:
      return self.teachers[0]
    return route(row, self.teachers, self.route_key)


_DATASET_KEYS = ("dataset", "groups_per_batch", "teacher", "teachers", "route_key", "data_files")


def _as_dict(raw: Any, where: str, what: str) -> dict[str, Any]:
  if hasattr(raw, "to_dict") and not isinstance(raw, Mapping):  # ml_collections.ConfigDict is not a Mapping
    raw = raw.to_dict()
  if not isinstance(raw, Mapping):
    _fail(where, f"expected {what}, got {type(raw).__name__} {raw!r}")
  return dict(raw)


def _refuse_unknown(raw: Mapping[str, Any], known: Sequence[str], where: str):
  for key in raw:
    if key in known:
      continue
    close = _REFERENCE_NAMES.get(key) or next(iter(difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)),
                                              None)
    hint = f"; did you mean {close!r}?" if close else ""
    _fail(f"{where}.{key}", f"unknown key{hint} (accepted: {', '.join(known)})")


def _positive_int(value: Any, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    _fail(where, f"expected a positive integer, got {value!r}")
  return value


def teacher_from_dict(raw: Any, where: str = "teacher") -> TeacherConfig:
  """A teacher from a dict (or ConfigDict) of TeacherConfig fields, or a bare model path/name string.
  `name` defaults to the route value (itself defaulting to `model_path`)."""
  if isinstance(raw, str):
    raw = {"model_path": raw}
  fields = _as_dict(raw, where, "a dict of teacher fields or a model path string")
  _refuse_unknown(fields, _TEACHER_KEYS, where)
  # "" means unset: ml_collections string fields cannot be set to None from the command line.
  fields = {k: (None if v == "" and k != "model_path" else v) for k, v in fields.items()}
  if "model_path" not in fields:
    _fail(f"{where}.model_path", "missing: every teacher needs a model path or name")
  _validate_teacher_fields(fields, where, name_optional=True)  # here, so errors name the config path written
  if fields.get("name") is None:
    fields["name"] = fields.get("route_value") or fields["model_path"]
  return TeacherConfig(**fields)


def parse_teachers(raw: Any, where: str = "teachers") -> tuple[TeacherConfig, ...]:
  """A non-empty list of teachers with unique names and unique route values."""
  if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
    _fail(where, f"expected a non-empty list of teachers, got {raw!r}")
  teachers = tuple(teacher_from_dict(item, f"{where}[{i}]") for i, item in enumerate(raw))
  _check_unique(teachers, where)
  return teachers


def _check_unique(teachers: Sequence[TeacherConfig], where: str):
  for field in ("route_value", "name"):  # route first: a default name repeats the route value
    seen: dict[str, int] = {}
    for i, t in enumerate(teachers):
      value = getattr(t, field)
      if value in seen:
        extra = (" (route_value defaults to model_path: give teachers that share a model distinct route_value "
                 "and name)") if field == "route_value" else ""
        _fail(f"{where}[{i}].{field}", f"{value!r} is also the {field} of {where}[{seen[value]}]; each teacher "
              f"needs a unique {field}{extra}")
      seen[value] = i


def dataset_teachers_from_dict(raw: Any, where: str = "datasets[0]") -> DatasetTeachers:
  """`{dataset, groups_per_batch, teacher}` (one teacher), or `{dataset, groups_per_batch, teachers, route_key}`
  (routed per row; route_key defaults to 'teacher'); optional `data_files`."""
  fields = _as_dict(raw, where, "a dict with dataset, groups_per_batch and teacher (or teachers)")
  _refuse_unknown(fields, _DATASET_KEYS, where)
  dataset = _check_str(fields.get("dataset"), f"{where}.dataset", "a dataset builder name or JSONL path")
  groups = _positive_int(fields.get("groups_per_batch"), f"{where}.groups_per_batch")
  data_files = fields.get("data_files") or None  # "" is unset, as in the run configs
  if isinstance(data_files, (list, tuple)):
    data_files = tuple(_check_str(f, f"{where}.data_files[{i}]", "a file path") for i, f in enumerate(data_files))
  else:
    _check_str(data_files, f"{where}.data_files", "None, a path or a list of paths", optional=True)
  has_one, has_many = fields.get("teacher") is not None, fields.get("teachers") is not None
  if has_one == has_many:
    _fail(where, "give exactly one of 'teacher' (every row scored by one teacher) or 'teachers' with 'route_key' "
          "(each row routed by its route key)")
  if has_one:
    if fields.get("route_key"):
      _fail(f"{where}.route_key", "only meaningful with 'teachers'; a single 'teacher' scores every row")
    return DatasetTeachers(dataset, groups, (teacher_from_dict(fields["teacher"], f"{where}.teacher"),), None,
                           data_files)
  route_key = fields.get("route_key") or DEFAULT_ROUTE_KEY
  _check_str(route_key, f"{where}.route_key", "a non-empty row key")
  return DatasetTeachers(dataset, groups, parse_teachers(fields["teachers"], f"{where}.teachers"), route_key,
                         data_files)


def parse_datasets(raw: Any, where: str = "datasets") -> tuple[DatasetTeachers, ...]:
  """Per-dataset mode: every step takes `groups_per_batch` prompts from each entry into one batch. A teacher
  used by several entries must be the same config wherever its name appears."""
  if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw:
    _fail(where, f"expected a non-empty list of {{dataset, groups_per_batch, teacher}} dicts, got {raw!r}")
  specs = tuple(dataset_teachers_from_dict(item, f"{where}[{i}]") for i, item in enumerate(raw))
  by_name: dict[str, tuple[TeacherConfig, str]] = {}
  for i, spec in enumerate(specs):
    for t in spec.teachers:
      if t.name in by_name and by_name[t.name][0] != t:
        _fail(f"{where}[{i}]", f"teacher name {t.name!r} is used by {by_name[t.name][1]} with a different config "
              f"({by_name[t.name][0]} vs {t}); give different teachers different names")
      by_name.setdefault(t.name, (t, f"{where}[{i}]"))
  return specs


def dataset_teachers_from_config(config: Any) -> tuple[DatasetTeachers, ...]:
  """The run's data sources and teachers from an OPD config (`jopd/config.py::opd`): `datasets` (per-dataset
  mode), else `teachers` + `route_key` over `dataset` (routed), else the single `teacher_model` (with
  `teacher_checkpoint`, `teacher_tokenizer_path`) over `dataset`."""
  get = lambda key, default=None: config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  datasets, teachers = get("datasets") or (), get("teachers") or ()
  if datasets and teachers:
    _fail("config.teachers", "set either config.datasets (each entry with its own teacher or teachers) or "
          "config.teachers (routed over config.dataset), not both")
  if datasets:
    return parse_datasets(datasets, "config.datasets")
  source = {"dataset": get("dataset"), "groups_per_batch": get("groups_per_batch"),
            "data_files": get("data_files") or None}
  if teachers:
    source.update(teachers=teachers, route_key=get("route_key"))
  else:
    _check_str(get("teacher_model"), "config.teacher_model", "a teacher model path or name (or set config.teachers "
               "or config.datasets)")
    # One teacher: its metrics are teacher_kl/teacher, teacher_route/teacher/... whatever its path.
    source["teacher"] = {"name": "teacher", "model_path": get("teacher_model"),
                         "checkpoint_path": get("teacher_checkpoint"),
                         "tokenizer_path": get("teacher_tokenizer_path")}
  return (dataset_teachers_from_dict(source, "config"),)


def all_teachers(specs: Sequence[DatasetTeachers]) -> tuple[TeacherConfig, ...]:
  """Every distinct teacher of a run, in first-use order."""
  seen: dict[str, TeacherConfig] = {}
  for spec in specs:
    for t in spec.teachers:
      seen.setdefault(t.name, t)
  return tuple(seen.values())


def route(row: Mapping[str, Any], teachers: Sequence[TeacherConfig], route_key: str = DEFAULT_ROUTE_KEY
          ) -> TeacherConfig:
  """The one teacher whose `route_value` equals `row[route_key]` exactly (no blending, no normalisation).

  Raises `jopd.data.rows.RowError` with reason `missing_route`, `route_not_string` or `unknown_route`; the data
  layer adds file and line and decides between skipping and raising (strict mode)."""
  if route_key not in row or row[route_key] is None:
    raise RowError(rows.MISSING_ROUTE, route_key, f"row has no {route_key!r} value; expected one of "
                   f"{_quoted(t.route_value for t in teachers)}")
  value = row[route_key]
  if not isinstance(value, str):
    raise RowError(rows.ROUTE_NOT_STRING, route_key, f"{route_key!r} is {type(value).__name__} {value!r}; expected "
                   f"a string, one of {_quoted(t.route_value for t in teachers)}")
  for t in teachers:
    if t.route_value == value:
      return t
  close = difflib.get_close_matches(value, [t.route_value for t in teachers], n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise RowError(rows.UNKNOWN_ROUTE, route_key, f"{route_key}={value!r} matches no teacher's route_value{hint}; "
                 f"expected one of {_quoted(t.route_value for t in teachers)}")


def _quoted(values) -> str:
  return ", ".join(repr(v) for v in values)


# ------------------------------------------------------------------------------------------- tokenizers

_ROLES = ("eos", "pad", "bos")
_TEMPLATE_TOKEN_RE = re.compile(r"<\|[^|<>\s'\"]+\|>")


def _vocab(tok) -> dict[str, int]:
  try:
    return dict(tok.get_vocab(with_added_tokens=True))  # tokenizers.Tokenizer
  except TypeError:
    return dict(tok.get_vocab())  # transformers tokenizers include added tokens


def _added_special(tok) -> dict[int, tuple[str, bool]]:
  decoder = tok.get_added_tokens_decoder() if hasattr(tok, "get_added_tokens_decoder") else tok.added_tokens_decoder
  return {int(i): (str(t.content), bool(t.special)) for i, t in decoder.items()}


def _role(tok, role: str) -> str | None:
  value = getattr(tok, f"{role}_token", None)
  return None if value is None else str(value)


def _extra_specials(tok) -> list[str]:
  extra = getattr(tok, "extra_special_tokens", None)
  if extra is None:
    extra = getattr(tok, "additional_special_tokens", None) or []
  if isinstance(extra, Mapping):
    extra = list(extra.values())
  return sorted(str(t) for t in extra)


def _template_tokens(tok, known: Collection[str]) -> set[str]:
  template = getattr(tok, "chat_template", None) or ""
  if isinstance(template, Mapping):
    template = "\n".join(str(v) for v in template.values())
  return set(_TEMPLATE_TOKEN_RE.findall(template)) | {t for t in known if t and t in template}


def check_tokenizers(student_tok, teacher_tok, teacher_name: str, *, ignore_roles: Collection[str] = ()):
  """Refuses a teacher whose tokenizer gives the student's token ids another meaning.

  Compares the full vocabularies (token -> id, added tokens included), which added tokens are special, the
  eos/pad/bos tokens (unless named in `ignore_roles`), the extra special tokens, and every special token that
  either chat template writes (it must be one token with the same id in both). Raises TokenizerMismatchError
  naming the first differing tokens and ids. Accepts transformers tokenizers or `tokenizers.Tokenizer`s."""
  unknown_roles = set(ignore_roles) - set(_ROLES)
  if unknown_roles:
    raise ValueError(f"{_HERE} check_tokenizers: ignore_roles={sorted(unknown_roles)}; accepted: {_ROLES}")
  problems = []
  s_vocab, t_vocab = _vocab(student_tok), _vocab(teacher_tok)
  s_by_id, t_by_id = {i: s for s, i in s_vocab.items()}, {i: s for s, i in t_vocab.items()}
  diffs = [i for i in sorted(set(s_by_id) | set(t_by_id)) if s_by_id.get(i) != t_by_id.get(i)]
  if diffs:
    shown = "; ".join(f"id {i}: student {s_by_id.get(i, '<none>')!r} vs teacher {t_by_id.get(i, '<none>')!r}"
                      for i in diffs[:3])
    more = f" (and {len(diffs) - 3} more ids)" if len(diffs) > 3 else ""
    problems.append(f"vocabularies differ at {len(diffs)} ids (student {len(s_vocab)} tokens, teacher "
                    f"{len(t_vocab)}): {shown}{more}")
  s_added, t_added = _added_special(student_tok), _added_special(teacher_tok)
  for i in sorted(set(s_added) & set(t_added)):
    if s_added[i] != t_added[i]:
      kind = lambda special: "special" if special else "non-special"
      problems.append(f"added token id {i}: student {s_added[i][0]!r} ({kind(s_added[i][1])}) vs teacher "
                      f"{t_added[i][0]!r} ({kind(t_added[i][1])})")
      break
  for role in _ROLES:
    s, t = _role(student_tok, role), _role(teacher_tok, role)
    if role not in ignore_roles and s != t:
      problems.append(f"{role}_token: student {s!r} (id {s_vocab.get(s)}) vs teacher {t!r} (id {t_vocab.get(t)}); "
                      f"pass ignore_roles=({role!r},) if the difference is intended")
  s_extra, t_extra = _extra_specials(student_tok), _extra_specials(teacher_tok)
  if s_extra != t_extra:
    only_s, only_t = sorted(set(s_extra) - set(t_extra)), sorted(set(t_extra) - set(s_extra))
    problems.append(f"extra special tokens differ: only the student has {only_s[:3]}, only the teacher has "
                    f"{only_t[:3]}")
  known = {c for c, _ in s_added.values()} | {c for c, _ in t_added.values()}
  for token in sorted(_template_tokens(student_tok, known) | _template_tokens(teacher_tok, known)):
    if token not in s_vocab or token not in t_vocab or s_vocab[token] != t_vocab[token]:
      problems.append(f"chat-template token {token!r}: student id {s_vocab.get(token)} vs teacher id "
                      f"{t_vocab.get(token)} (it must be one token with the same id in both)")
      break
  if problems:
    raise TokenizerMismatchError(
        f"{_HERE}: teacher {teacher_name!r}: its tokenizer is incompatible with the student's; the teacher scores "
        "the student's sampled token ids, so both must give every id the same token.\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------- environment


class EnvTeachers(NamedTuple):
  teachers: list[dict[str, str]] | None  # teacher dicts for `parse_teachers`, or None when unset
  route_key: str | None
  source: str | None  # the variable the teachers came from, for messages


def teachers_from_env(environ: Mapping[str, str] | None = None) -> EnvTeachers:
  """Reads DISTILLATION_TEACHERS (comma-separated model paths or names, each its own route value and name;
  legacy OPD_TEACHERS) and DISTILLATION_TEACHER_ROUTE_KEY (legacy OPD_TEACHER_ROUTE_KEY). Unset or blank
  variables give None; a set variable with no entries is an error."""
  environ = os.environ if environ is None else environ
  teachers, source = None, None
  for var in TEACHERS_ENV:
    if environ.get(var, "").strip():
      source = var
      entries = [e.strip() for e in environ[var].split(",")]
      if any(not e for e in entries):
        _fail(f"${var}", f"empty entry in {environ[var]!r}; expected comma-separated model paths or names, e.g. "
              "'Qwen/Qwen3-32B,/ckpts/math-teacher'")
      teachers = [{"model_path": e} for e in entries]
      break
  route_key = next((environ[v].strip() for v in ROUTE_KEY_ENV if environ.get(v, "").strip()), None)
  return EnvTeachers(teachers, route_key, source)
