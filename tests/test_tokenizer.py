"""Tests for jopd/data/tokenizer.py: the tiny Qwen2-style tokenizer survives save/reload and encodes any text."""
import pytest
import tokenizers
import transformers

from jopd.data import tokenizer as tokenizer_lib

TEXTS = ["hello world, the answer is 12+34=46.", "The quick brown fox jumps over the lazy dog!\n\n  indented",
         "What is 7*8? Final: 56", "don't we'll they're it's"] * 20
PROBES = ["hello world", "Ünïcödé and e\u0301 (combining) and 中文 and 🙂🚀", "  spaces\t\ttabs\r\n\r\nlines  ",
          "'S 'T 12345 ab123cd", "<|im_start|>user\nhi<|im_end|>\n", ""]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 🙂"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "7*8?"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tok")
  tok = tokenizer_lib.train_tokenizer(TEXTS, vocab_size=320, out_dir=out_dir)
  return tok, out_dir


def test_reload_gives_identical_ids_and_chat_template(saved):
  tok, out_dir = saved
  reloaded = transformers.AutoTokenizer.from_pretrained(out_dir)
  assert type(reloaded).__name__ == "Qwen2Tokenizer"
  for text in PROBES:
    assert reloaded.encode(text) == tok.encode(text), text
  for gen in (True, False):
    a = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    b = reloaded.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert a == b
  # The saved tokenizer.json alone (no transformers) must agree too: the pipeline rebuilt by Qwen2Tokenizer on
  # load and the one we trained with are the same.
  raw = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
  for text in PROBES:
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text), text


def test_special_tokens_follow_qwen_layout(saved):
  tok, _ = saved
  n = len(tok)
  assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == n - 3
  assert tok.convert_tokens_to_ids("<|im_start|>") == n - 2
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == n - 1
  assert tok.bos_token is None and tok.unk_token is None
  # Special tokens in text are single ids, not split into bytes.
  assert tok.encode("<|im_start|>") == [n - 2]
  vocab = tok.get_vocab()
  for b in tokenizers.pre_tokenizers.ByteLevel.alphabet():
    assert b in vocab, f"byte {b!r} missing"
  # Training learned merges: frequent words are far shorter than their bytes.
  assert len(tok.encode(" quick brown fox")) < len(" quick brown fox") // 2


def test_byte_fallback_is_lossless_for_unseen_characters(saved):
  tok, _ = saved
  for text in PROBES[1:3] + ["🦜 ꙮ 𝔘𝔫𝔦"]:
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == tokenizers.normalizers.NFC().normalize_str(text)


def test_chat_template_renders_qwen3_layout(saved):
  tok, _ = saved
  text = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=False)
  assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi 🙂<|im_end|>\n"
                  "<|im_start|>assistant\n")
  out = tok.apply_chat_template(MESSAGES[:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = out["input_ids"], out["assistant_masks"]
  # Only the assistant content and its <|im_end|> are marked (what SFT weights); the newline after is not.
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|im_end|>"


def test_vocab_size_too_small_is_refused():
  with pytest.raises(ValueError, match="vocab_size=100.*>= 259"):
    tokenizer_lib.train_tokenizer(TEXTS, vocab_size=100)
