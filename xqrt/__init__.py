"""xqrt: a llama.cpp-style inference runtime whose cache stores quantized activations (XQuant)."""
from .engine import Engine
from .errors import XQError
from .gguf_model import load_model

__all__ = ["Engine", "XQError", "load_model"]
__version__ = "0.1.0"
