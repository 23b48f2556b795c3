"""Shared test fixtures for the data layer: a tiny trained tokenizer and JSONL writers (no network)."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable

from jopd.data import tokenizer as tokenizer_lib

# Text the tiny tokenizer is trained on: arithmetic prompts and chat-like English, enough for real merges.
CORPUS = [f"What is {a} + {b}? Answer with Final: {a + b}." for a in range(12) for b in range(12)] + [
    "You are a helpful assistant. Explain briefly, then end with exactly one line: Final: <answer>.",
    "The quick brown fox jumps over the lazy dog.",
]


def tiny_tokenizer(out_dir: str | pathlib.Path | None = None, vocab_size: int = 400):
  """A Qwen2-style tokenizer with the Qwen3 chat layout, trained in well under a second."""
  return tokenizer_lib.train_tokenizer(CORPUS, vocab_size=vocab_size, out_dir=out_dir)


def user(content: Any) -> dict[str, Any]:
  return {"role": "user", "content": content}


def prompt_row(question: str, **extra) -> dict[str, Any]:
  return {"messages": [user(question)], **extra}


def write_jsonl(path: str | pathlib.Path, lines: Iterable[Any]) -> str:
  """Writes each item as one line: dicts/lists as JSON, `str` as raw text, `bytes` as raw bytes (bad input)."""
  with open(path, "wb") as f:
    for line in lines:
      if isinstance(line, bytes):
        f.write(line)
      elif isinstance(line, str):
        f.write(line.encode("utf-8"))
      else:
        f.write(json.dumps(line).encode("utf-8"))
      f.write(b"\n")
  return str(path)
