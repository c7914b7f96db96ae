"""Fixtures: tiny random Llama checkpoints written as GGUF, and the real SmolLM2 file."""
from __future__ import annotations

import os

import numpy as np
import pytest

SMOLLM2_ENV = "XQRT_SMOLLM2"  # optional path override for the SmolLM2 GGUF


def byte_vocab():
    """A byte-level vocabulary: the 256 byte symbols, a few merges, and chat control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    bytes_to_unicode = sorted(alphabet, key=lambda ch: ord(ch))
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes_to_unicode
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens += ["Ġt", "he", "Ġthe", "in", "an"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


# transformers' module names → llama.cpp's GGUF tensor roles
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute_rows(w, n_head):
    """llama.cpp's Q/K row order: HF's rotate-half pairs (i, i+hd/2) become adjacent rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, hf_model, qtype="F32", arch="llama", tie=False, vocab=None):
    """Write a transformers LlamaForCausalLM to GGUF the way llama.cpp's converter names it."""
    import gguf
    cfg = hf_model.config
    tokens, merges, types = vocab or byte_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    gtype = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2 and gtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quantize(arr, gtype) if gtype not in (gguf.GGMLQuantizationType.F16,) else arr.astype(np.float16)
            w.add_tensor(name, data, raw_shape=arr.shape if gtype == gguf.GGMLQuantizationType.F16 else None,
                         raw_dtype=gtype)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in HF_TO_GGUF.items():
            suffix = ".weight"
            t = sd[f"model.layers.{i}.{hf}{suffix}"]
            if gg == "attn_q":
                t = permute_rows(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = permute_rows(t, cfg.num_key_value_heads)
            put(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_llama(n_head=4, n_kv_head=2, hidden=128, layers=2, ff=256, vocab=None, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    n_vocab = len((vocab or byte_vocab())[0])
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is too tame: give the norms some spread
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    model = tiny_llama(n_head=4, n_kv_head=2)
    return model, write_llama_gguf(tmp_path_factory.mktemp("tiny") / "gqa.gguf", model)


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory):
    model = tiny_llama(n_head=4, n_kv_head=4, seed=1)
    return model, write_llama_gguf(tmp_path_factory.mktemp("tiny") / "mha.gguf", model)


@pytest.fixture(scope="session")
def smollm2_path():
    path = os.environ.get(SMOLLM2_ENV)
    if path:
        return path
    from xqrt.default_model import default_model_path
    return default_model_path(quiet=True)
