"""Prepare time for requests with many realistic tools: request mapping (schema checks),
render and decoding-constraint build, first request (caches cleared) and cached (the same
tool set again, as every later turn of a session sends it).

    PYTHONPATH=. python bench/tools_prepare.py [--families glm47,glm51,chatml,glm4] [--sizes 50,200,1000]

Tools are Claude Code's own definitions (tests/data/claude-code) and the BFCL sample's,
cycled and renamed to N distinct tools, each with its own schema text (a per-tool
description), so no two tools share a cached schema grammar.  Optionally (``--compile``)
also times xgrammar's compile of the constraint against a tokenizer (what vLLM does next,
in the engine, once per distinct grammar).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from glmserve.api.mapping import chat_request_from_openai
from glmserve.api.schemas import ChatCompletionRequest
from glmserve.formats import get_format, grammar

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def pool() -> list[dict[str, Any]]:
    out = []
    cc = json.loads((DATA / "claude-code" / "request-1.json").read_text())["body"]["tools"]
    for t in cc:
        if t.get("defer_loading"):
            continue
        out.append({"name": t["name"], "description": t.get("description", "")[:400], "parameters": t["input_schema"]})
    seen = {t["name"] for t in out}
    for line in (DATA / "bfcl" / "bfcl-sample.jsonl").read_text().splitlines():
        for t in json.loads(line)["request"].get("tools", []):
            fn = t["function"]
            if fn["name"] not in seen and isinstance(fn.get("parameters"), dict):
                seen.add(fn["name"])
                out.append(copy.deepcopy(fn))
    return out


def tools(n: int) -> list[dict[str, Any]]:
    base = pool()
    out = []
    for i in range(n):
        fn = copy.deepcopy(base[i % len(base)])
        fn["name"] = f"{fn['name'][:40]}_{i}".replace(".", "_")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        params = {**params, "description": f"arguments of tool {i}"}
        params.pop("$schema", None)
        fn["parameters"] = params
        out.append({"type": "function", "function": fn})
    return out


def once(fmt_name: str, body: dict[str, Any]) -> dict[str, float]:
    fmt = get_format(fmt_name)
    t0 = time.perf_counter()
    chat = chat_request_from_openai(ChatCompletionRequest.model_validate(body), content_joiner=fmt.content_joiner)
    t1 = time.perf_counter()
    prompt = fmt.render(chat)
    t2 = time.perf_counter()
    constraint = fmt.constraint(chat)
    t3 = time.perf_counter()
    assert constraint is not None and prompt.text
    return {"mapping": t1 - t0, "render": t2 - t1, "constraint": t3 - t2, "total": t3 - t0,
            "grammar": constraint.grammar}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="glm47,glm51,chatml,glm4")
    ap.add_argument("--sizes", default="50,200,1000")
    ap.add_argument("--compile", default=None, metavar="TOKENIZER_DIR",
                    help="also time xgrammar's compile of the constraint with this tokenizer")
    a = ap.parse_args()
    compiler = None
    if a.compile:
        import xgrammar
        from transformers import AutoTokenizer

        compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(a.compile)),
                                            cache_enabled=False)
    print("family  tools  first: mapping render constraint total (ms)  |  cached: total (ms)  grammar KiB"
          + ("  xgrammar compile (ms)" if compiler else ""))
    for fam in a.families.split(","):
        once(fam, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools(3)})  # imports, warm-up
        for n in (int(x) for x in a.sizes.split(",")):
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools(n)}
            grammar.clear_caches()
            first = once(fam, body)
            cached = statistics.median(once(fam, body)["total"] for _ in range(3))
            line = (f"{fam:7s} {n:5d}  {first['mapping']*1e3:8.1f} {first['render']*1e3:6.1f} "
                    f"{first['constraint']*1e3:9.1f} {first['total']*1e3:8.1f}  |  {cached*1e3:8.1f}"
                    f"  {len(first['grammar'])/1024:8.0f}")
            if compiler is not None:
                t = time.perf_counter()
                compiler.compile_grammar(first["grammar"])
                line += f"  {(time.perf_counter() - t)*1e3:10.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
