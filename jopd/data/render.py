"""Chat rendering: a row's messages -> prompt token ids through the tokenizer's own chat template.

The student prompt and the teacher context (teacher_messages, else messages) share one rendering path.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jopd.data import rows as rows_lib
from jopd.data.rows import RowError


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], max_tokens: int | None = None,
                  field: str = "messages") -> np.ndarray:
  """Token ids [L] int32 of `messages` followed by the generation prompt (`<|im_start|>assistant\\n` for Qwen).

  Raises RowError 'prompt_too_long' when longer than `max_tokens`, 'render_error' when the template refuses the
  messages (e.g. a template that requires the system message first).
  """
  try:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
  except Exception as e:  # jinja raises TemplateError or plain exceptions from `raise_exception`
    raise RowError(rows_lib.RENDER_ERROR, field, f"the chat template refused these messages: {e}") from e
  ids_l = np.asarray(ids, np.int32)
  if max_tokens is not None and len(ids_l) > max_tokens:
    raise RowError(rows_lib.PROMPT_TOO_LONG, field,
                   f"{len(ids_l)} tokens once rendered; max_prompt_tokens={max_tokens}")
  return ids_l


def render_teacher_context(tokenizer: Any, row: dict[str, Any], max_tokens: int | None = None,
                           teacher_messages_key: str = rows_lib.DEFAULT_TEACHER_MESSAGES_KEY) -> np.ndarray:
  """Token ids [L] int32 of the teacher's context: the row's privileged `teacher_messages_key` when present,
  else its `messages`, rendered with the teacher's tokenizer. The completion ids are appended by the caller."""
  key = teacher_messages_key if row.get(teacher_messages_key) is not None else "messages"
  return render_prompt(tokenizer, row[key], max_tokens, field=key)
