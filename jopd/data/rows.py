"""The JSONL row contract (messages, route key, teacher_messages, expected_answer, extra_info) and its checks.

Bad rows raise `RowError`; a `SkipCounter` counts them by reason, logs the first of each, or raises when strict.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Mapping

log = logging.getLogger("jopd.data")

ROLES = ("system", "user", "assistant")
DEFAULT_TEACHER_MESSAGES_KEY = "teacher_messages"
# Keys a row may carry besides its teacher-messages keys and route key; anything else is kept but ignored.
CONTRACT_KEYS = ("messages", "expected_answer", "extra_info")

# Machine reasons, used as metric names `data/skipped/<reason>`.
BAD_JSON = "bad_json"                # a line that is not JSON
BAD_ENCODING = "bad_encoding"        # a line that is not UTF-8, or text with a lone surrogate
BAD_TYPE = "bad_type"                # a field of the wrong type (row not an object, content not a string, ...)
MISSING_MESSAGES = "missing_messages"
MISSING_FIELD = "missing_field"      # a builder's source column is absent (e.g. deepmath `question`)
EMPTY_MESSAGES = "empty_messages"    # no message left once trailing assistant turns are dropped
BAD_ROLE = "bad_role"
EMPTY_CONTENT = "empty_content"
PROMPT_TOO_LONG = "prompt_too_long"
RENDER_ERROR = "render_error"        # the chat template refused the messages
MISSING_ROUTE = "missing_route"      # raised by jopd/teachers.py routing
ROUTE_NOT_STRING = "route_not_string"
UNKNOWN_ROUTE = "unknown_route"


class RowError(ValueError):
  """A row that breaks the contract: `reason` (metric name), `field` (e.g. 'messages[1].role'), `message`.

  `where` ('file.jsonl:12') is filled in by whoever knows the row's origin (`SkipCounter.skip`).
  """

  def __init__(self, reason: str, field: str, message: str, where: str | None = None):
    self.reason, self.field, self.message, self.where = reason, field, message, where
    super().__init__(str(self))

  def __str__(self) -> str:
    prefix = f"{self.where}: " if self.where else ""
    return f"{prefix}field {self.field!r}: {self.message} [{self.reason}]"

  def at(self, where: str) -> "RowError":
    return RowError(self.reason, self.field, self.message, where)


class SkipCounter:
  """Counts skipped rows by reason; logs the first skip of each reason with its location and field.

  With `strict=True` the first skip raises the `RowError` instead, located at file:line and naming the field.
  """

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter[str] = collections.Counter()

  def skip(self, error: RowError, where: str) -> None:
    located = error.at(where)
    if self.strict:
      raise located
    if not self.counts[error.reason]:
      log.warning("skipping row: %s (first '%s' skip; later ones are counted in data/skipped/%s)",
                  located, error.reason, error.reason)
    self.counts[error.reason] += 1

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def metrics(self) -> dict[str, int]:
    return {f"data/skipped/{reason}": n for reason, n in sorted(self.counts.items())}


def _check_messages(value: Any, field: str, keep_assistant: bool) -> list[dict[str, str]]:
  """Returns the messages as plain {role, content} dicts, trailing assistant turns dropped unless kept."""
  if not isinstance(value, list):
    raise RowError(BAD_TYPE, field, f"expected a list of {{role, content}} objects, got {type(value).__name__}")
  messages = []
  for i, message in enumerate(value):
    where = f"{field}[{i}]"
    if not isinstance(message, Mapping):
      raise RowError(BAD_TYPE, where, f"expected a {{role, content}} object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
      raise RowError(BAD_ROLE, f"{where}.role", f"role {role!r} is not one of {'/'.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
      raise RowError(BAD_TYPE, f"{where}.content", f"expected a string, got {type(content).__name__}")
    if not content.strip():
      raise RowError(EMPTY_CONTENT, f"{where}.content", "content is empty; expected a non-empty string")
    try:
      content.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON allows "\ud800"; no tokenizer can encode a lone surrogate
      raise RowError(BAD_ENCODING, f"{where}.content", f"character {e.object[e.start]!r} at offset {e.start} is a "
                     "lone UTF-16 surrogate; expected valid Unicode text (a \\uD8xx escape needs its \\uDCxx "
                     "pair)") from None
    messages.append({"role": role, "content": content})
  if not keep_assistant:
    while messages and messages[-1]["role"] == "assistant":
      messages.pop()
  if not messages:
    what = "no messages" if not value else "only assistant messages (dropped: a prompt ends before the answer)"
    raise RowError(EMPTY_MESSAGES, field, f"{what}; expected at least one system/user message")
  return messages


def validate_row(row: Any, *, teacher_messages_keys: Iterable[str] = (DEFAULT_TEACHER_MESSAGES_KEY,),
                 keep_assistant: bool = False) -> dict[str, Any]:
  """Checks one row against the contract and returns a normalised copy.

  `messages` and any present `teacher_messages_keys` become plain {role, content} lists; trailing assistant turns
  are dropped (OPD prompts) unless `keep_assistant` (SFT conversations). `expected_answer` must be a string when
  present. Other keys (route key, extra_info, ...) are passed through; routing is checked by the caller.
  """
  if not isinstance(row, Mapping):
    raise RowError(BAD_TYPE, "<row>", f"expected a JSON object, got {type(row).__name__}")
  if row.get("messages") is None:
    raise RowError(MISSING_MESSAGES, "messages", "no 'messages'; expected a list of {role, content} objects")
  out = dict(row)
  out["messages"] = _check_messages(row["messages"], "messages", keep_assistant)
  for key in teacher_messages_keys:
    if row.get(key) is not None:
      out[key] = _check_messages(row[key], key, keep_assistant)
  answer = row.get("expected_answer")
  if answer is not None and not isinstance(answer, str):
    raise RowError(BAD_TYPE, "expected_answer", f"expected a string, got {type(answer).__name__}")
  return out
