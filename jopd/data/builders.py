"""Dataset builders: read a hub dataset, local JSONL/parquet copies or a row-contract JSONL file as rows.

Each source row becomes a `Record` that is a row of the contract (jopd/data/rows.py) or a located `RowError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import fsspec

from jopd.data import rows as rows_lib
from jopd.data.rows import RowError


class Record(NamedTuple):
  """One source row: `where` ('file.jsonl:12', 'org/name[train]:7') and either `row` or `error`."""
  where: str
  row: dict[str, Any] | None
  error: RowError | None = None


def _text(source: Mapping[str, Any], column: str) -> str:
  value = source.get(column)
  if value is None:
    raise RowError(rows_lib.MISSING_FIELD, column, f"{column!r} is missing or null; expected a string")
  if not isinstance(value, str):
    raise RowError(rows_lib.BAD_TYPE, column, f"expected a string, got {type(value).__name__}")
  return value


def deepmath_row(source: Mapping[str, Any]) -> dict[str, Any]:
  """zwhe99/DeepMath-103K: `question` is the user turn, `final_answer` the expected answer."""
  row: dict[str, Any] = {"messages": [{"role": "user", "content": _text(source, "question")}]}
  answer = source.get("final_answer")
  if answer is not None:
    row["expected_answer"] = answer if isinstance(answer, str) else str(answer)
  row["extra_info"] = {k: source[k] for k in ("difficulty", "topic") if k in source}
  return row


def tulu3_row(source: Mapping[str, Any]) -> dict[str, Any]:
  """allenai/tulu-3-sft-mixture: the prompt is the conversation's first user message alone."""
  messages = source.get("messages")
  if not isinstance(messages, list):
    raise RowError(rows_lib.MISSING_MESSAGES if messages is None else rows_lib.BAD_TYPE, "messages",
                   "expected a list of {role, content} objects")
  for message in messages:
    if isinstance(message, Mapping) and message.get("role") == "user":
      return {"messages": [{"role": "user", "content": message.get("content")}],
              "extra_info": {k: source[k] for k in ("id", "source") if k in source}}
  raise RowError(rows_lib.EMPTY_MESSAGES, "messages", "no user message; expected at least one")


_OPENTHOUGHTS_ROLES = {"human": "user"}


def openthoughts3_row(source: Mapping[str, Any]) -> dict[str, Any]:
  """open-thoughts/OpenThoughts3-1.2M: `conversations[{from, value}]`, human -> user, anything else -> assistant.

  The whole conversation is kept: this builder feeds SFT, where the assistant turns are the targets.
  """
  conversations = source.get("conversations")
  if not isinstance(conversations, list):
    raise RowError(rows_lib.MISSING_MESSAGES if conversations is None else rows_lib.BAD_TYPE, "conversations",
                   "expected a list of {from, value} objects")
  messages = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, Mapping):
      raise RowError(rows_lib.BAD_TYPE, f"conversations[{i}]", "expected a {from, value} object")
    messages.append({"role": _OPENTHOUGHTS_ROLES.get(turn.get("from"), "assistant"), "content": turn.get("value")})
  return {"messages": messages, "extra_info": {k: source[k] for k in ("domain", "source") if k in source}}


def contract_row(source: Any) -> dict[str, Any]:
  """A row already in the contract's shape ('messages' and 'jsonl' builders): checked later, passed as is."""
  if not isinstance(source, Mapping):
    raise RowError(rows_lib.BAD_TYPE, "<row>", f"expected a JSON object, got {type(source).__name__}")
  return dict(source)


@dataclasses.dataclass(frozen=True)
class Builder:
  to_row: Callable[[Any], dict[str, Any]]
  hub_name: str | None = None
  # True for SFT conversations (keep the assistant turns), False for OPD prompts.
  keep_assistant: bool = False


BUILDERS: dict[str, Builder] = {
    "deepmath": Builder(deepmath_row, "zwhe99/DeepMath-103K"),
    "tulu3": Builder(tulu3_row, "allenai/tulu-3-sft-mixture"),
    "openthoughts3": Builder(openthoughts3_row, "open-thoughts/OpenThoughts3-1.2M", keep_assistant=True),
    "messages": Builder(contract_row),
    "jsonl": Builder(contract_row),
}
_LOCAL_SUFFIXES = (".jsonl", ".parquet")


def resolve(dataset: str, data_files: str | Sequence[str] | None = None) -> tuple[Builder, list[str]]:
  """Maps the config's `dataset` (builder name or a .jsonl/.parquet path) and `data_files` to a builder and
  a list of local files (empty: load the builder's hub dataset)."""
  files = [data_files] if isinstance(data_files, str) else list(data_files or [])
  if dataset not in BUILDERS:
    if not dataset.endswith(_LOCAL_SUFFIXES):
      raise ValueError(f"config field 'dataset'={dataset!r} is neither a builder ({', '.join(BUILDERS)}) nor a "
                       f"path ending in {' or '.join(_LOCAL_SUFFIXES)}")
    if files:
      raise ValueError(f"config field 'data_files' is set but 'dataset'={dataset!r} is already a file; "
                       "set 'dataset' to a builder name to point it at data files")
    return BUILDERS["jsonl"], [dataset]
  builder = BUILDERS[dataset]
  if not files and builder.hub_name is None:
    raise ValueError(f"config field 'dataset'={dataset!r} needs 'data_files' (.jsonl or .parquet files)")
  for path in files:
    if not path.endswith(_LOCAL_SUFFIXES):
      raise ValueError(f"config field 'data_files': {path!r} must end in {' or '.join(_LOCAL_SUFFIXES)}")
  return builder, files


def read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
  """Yields ('path:line', parsed object or RowError) per non-blank line.

  Our own reader rather than `datasets`: one bad line (bad JSON, bad UTF-8) is one counted skip with its line
  number, where `datasets` would reject the whole file.
  """
  try:
    opened = fsspec.open(path, "rb").open()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
    raise type(e)(f"{path}: cannot read it ({e.strerror or e}); expected a readable JSONL file of the row contract "
                  "(one JSON object with 'messages' per line)") from e
  with opened as f:
    for line_number, raw in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      if not raw.strip():
        continue
      try:
        # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first row.
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield where, RowError(rows_lib.BAD_ENCODING, "<line>", f"not UTF-8 ({e.reason} at byte {e.start})")
        continue
      try:
        yield where, json.loads(text)
      except json.JSONDecodeError as e:
        yield where, RowError(rows_lib.BAD_JSON, "<line>", f"not JSON ({e.msg} at column {e.colno})")


def _read_with_datasets(path: str | None, hub_name: str | None, split: str, max_rows: int | None,
                        cache_dir: str | None) -> Iterator[tuple[str, Any]]:
  import datasets  # heavy import, only when a parquet file or hub dataset is read

  if path is not None:
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache_dir)
    label = path
  else:
    try:
      ds = datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, missing split, auth: all surface as different exception types
      raise RuntimeError(
          f"could not load hub dataset {hub_name!r} split {split!r} ({type(e).__name__}: {e}). Without network "
          f"access (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}) only datasets already in the "
          "HF cache load; otherwise download its files and pass them with --config.data_files=...") from e
    label = f"{hub_name}[{split}]"
  if max_rows is not None:
    ds = ds.select(range(min(max_rows, len(ds))))
  for i, source in enumerate(ds):
    yield f"{label}:{i + 1}", source


def read_records(dataset: str, data_files: str | Sequence[str] | None = None, split: str = "train",
                 max_rows: int | None = None, cache_dir: str | None = None) -> Iterator[Record]:
  """Yields every source row of `dataset` as a `Record`, at most `max_rows` of them (bad rows included).

  `split` selects the hub split; local files are read whole. `.jsonl` files go through `read_jsonl`, `.parquet`
  files and hub datasets through `datasets.load_dataset`.
  """
  builder, files = resolve(dataset, data_files)
  if files:
    sources = (read_jsonl(p) if p.endswith(".jsonl") else _read_with_datasets(p, None, split, max_rows, cache_dir)
               for p in files)
  else:
    sources = iter([_read_with_datasets(None, builder.hub_name, split, max_rows, cache_dir)])
  count = 0
  for source in sources:
    for where, value in source:
      if max_rows is not None and count >= max_rows:
        return
      count += 1
      if isinstance(value, RowError):
        yield Record(where, None, value)
        continue
      try:
        yield Record(where, builder.to_row(value))
      except RowError as e:
        yield Record(where, None, e)
