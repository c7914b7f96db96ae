"""Our GGUF tokenizer against transformers' tokenizer built from the same GGUF."""
import os

import pytest

from xqrt.gguf_model import read_gguf
from xqrt.tokenizer import Tokenizer

TEXTS = [
    "Hello world", "  leading spaces and   runs   of spaces", "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Unicode: naïve café, Grüße,日本語のテキスト, Привет мир", "emoji 🤖🚀 and 👩‍👩‍👧 family", "ZWJ\u200bzero width",
    "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nhi<|im_end|>\n", "trailing space ",
    "ALL CAPS and MixedCase and snake_case_words", "punctuation!!! ??? ... --- ''' \"\"\"", "",
]
DIGITS = ["3.14159 and 2026-11-23", "x = 12345 + 67890", "version 1.0.2, 100%"]


@pytest.fixture(scope="module")
def tokenizers(smollm2_path):
    from transformers import AutoTokenizer
    ours = Tokenizer(read_gguf(smollm2_path)[1])
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(text, tokenizers):
    ours, theirs = tokenizers
    assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("text", DIGITS)
def test_digits_split_one_by_one_like_llama_cpp_smollm(text, tokenizers):
    """SmolLM2's own tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) split digits one by
    one; transformers' GGUF loader does not know `smollm` and merges them, so it is no reference here."""
    ours, _ = tokenizers
    ids = ours.encode(text, add_bos=False)
    pieces = [ours.decode([i]) for i in ids]
    assert all(len(p.strip()) <= 1 for p in pieces if any(ch.isdigit() for ch in p))
    assert ours.decode(ids) == text


def test_special_tokens_and_chat_template(tokenizers):
    ours, theirs = tokenizers
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = ours.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours.encode(text)
    # system, user and the assistant prompt each open with <|im_start|> (the BOS id); none added twice
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 3
    assert ours.eos_id in ours.end_ids
