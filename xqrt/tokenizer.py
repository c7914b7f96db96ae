"""GGUF vocabulary → a Hugging Face `tokenizers` tokenizer, special tokens and the chat template.

Two vocabulary kinds: `gpt2` (byte-level BPE; the pre-tokenizer regex comes from
`tokenizer.ggml.pre`, as in llama.cpp) and `llama` (SentencePiece BPE: merges recovered from the
scores, byte fallback, "▁" for spaces).
"""
from __future__ import annotations

import sys
from datetime import datetime

from .errors import XQError

CONTROL, USER_DEFINED = 3, 4
# llama.cpp ends generation on any of these when the vocabulary marks them as control tokens.
END_OF_GENERATION = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>", "<end_of_turn>", "<|eom_id|>")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → (split regex, or None for GPT-2's own; digits one by one; whole words that
# are in the vocabulary skip the merges, as Llama 3's tokenizer.json says)
_PRE_TOKENIZERS = {
    "default": (None, False, False), "gpt2": (None, False, False), "gpt-2": (None, False, False),
    "smollm": (None, True, False), "starcoder": (None, True, False), "refact": (None, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True), "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True), "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "dbrx": (_LLAMA3_SPLIT, False, False), "qwen2": (_QWEN2_SPLIT, False, False),
}


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """The llama.cpp name (a key of _PRE_TOKENIZERS) of a tokenizer.json pre-tokenizer, or None
    when it is none of them: the inverse of `_byte_level`, for the converter."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space") else None
    if byte_level is None:
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) \
            and str(steps[0].get("behavior", "")).lower() == "isolated" and not steps[0].get("invert"):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _byte_level(tokens, merges, pre):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    if pre not in _PRE_TOKENIZERS:
        print(f"xqrt: unknown pre-tokenizer {pre!r}, using GPT-2's", file=sys.stderr)
    split, digits, ignore_merges = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else () for m in merges]
    broken = next((i for i, pair in enumerate(pairs) if len(pair) != 2), None)
    if broken is not None:
        raise XQError(f"GGUF's tokenizer.ggml.merges[{broken}] is not two tokens and a space: {merges[broken]!r}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs,
                               ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens, scores, add_space_prefix):
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    # SentencePiece BPE merges the pair whose result scores highest: recover that order.
    merges = []
    for t, i in vocab.items():
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], vocab[b], a, b))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], byte_fallback=True,
                               unk_token="<unk>" if "<unk>" in vocab else None, fuse_unk=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


class Tokenizer:
    def __init__(self, metadata: dict):
        from tokenizers import AddedToken
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise XQError("GGUF has no tokenizer vocabulary (tokenizer.ggml.model / tokens)")
        types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if kind not in ("gpt2", "llama"):
            raise XQError(f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        try:
            if kind == "gpt2":
                self._tok = _byte_level(tokens, metadata.get("tokenizer.ggml.merges", []),
                                        metadata.get("tokenizer.ggml.pre", "default"))
            else:
                scores = list(metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
                self._tok = _sentencepiece(tokens, scores, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
        except XQError:
            raise
        except Exception as e:  # noqa: BLE001 — `tokenizers` raises bare Exceptions on a bad vocabulary
            raise XQError(f"GGUF's tokenizer is malformed: {str(e).splitlines()[0]}") from None
        default_bos = kind == "llama"
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
        self._tok.add_special_tokens(special)
        self._tok.add_tokens(user)
        self.tokens = tokens
        self.n_vocab = len(tokens)
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        self.chat_template = metadata.get("tokenizer.chat_template")
        self.end_ids = {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in END_OF_GENERATION}
        if self.eos_id is not None:
            self.end_ids.add(int(self.eos_id))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None \
                and not (ids and ids[0] == self.bos_id):
            ids = [int(self.bos_id)] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the GGUF's Jinja chat template the way transformers does."""
        if not self.chat_template:
            raise XQError("this model has no chat template (tokenizer.chat_template)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        name = lambda i: self.tokens[int(i)] if i is not None and 0 <= int(i) < self.n_vocab else ""
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=name(self.bos_id), eos_token=name(self.eos_id))
        except TemplateError as e:
            raise XQError(f"chat template failed: {e}") from None
