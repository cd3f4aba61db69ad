"""Time to the first tool-call chunk of auto and required answers on a new tool set and again,
against a running glmserve (with and without --wait-for-grammar), on tiny glm51, which is disposed
to close its reasoning at once and call (tests/tiny_models.py):

    glmserve serve ~/.cache/glmserve/tiny/glm51 --port 18103 --max-model-len 2048 --enforce-eager \
        --served-model-name m [--wait-for-grammar]
    python bench/first_call.py http://127.0.0.1:18103 m 2

12 tools, greedy, one call per answer (parallel_tool_calls false, max_tokens 60); "again" comes
8 s after "first" (the background compile done). Prints per (tool_choice, first/again) the
medians of: first generated chunk, first tool-call chunk, whole answer (seconds).
"""
import json, sys, time, uuid, httpx, statistics
URL, MODEL, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
S = {"type": "object", "properties": {"env": {"type": "string", "enum": ["prod", "staging"]}, "replicas": {"type": "integer", "minimum": 1, "maximum": 9}, "note": {"type": "string"}}, "required": ["env", "replicas"], "additionalProperties": False}
def tools(nonce):
    return [{"type": "function", "function": {"name": f"tool{i}_{nonce}", "description": "x", "parameters": {**S, "properties": {**S["properties"], f"p{i}": {"type": "integer"}}}}} for i in range(12)]
def one(body):
    t0 = time.perf_counter(); first = call = None
    with httpx.stream("POST", URL + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]": continue
            o = json.loads(line[5:])
            for ch in o.get("choices") or []:
                d = ch.get("delta") or {}
                now = time.perf_counter() - t0
                if first is None and (d.get("content") or d.get("reasoning_content") or d.get("tool_calls")): first = now
                if call is None and d.get("tool_calls"): call = now
    return first, call, time.perf_counter() - t0
res = {}
for k in range(N):
    nonce = uuid.uuid4().hex[:8]
    for choice in ["auto", "required"]:
        body = dict(model=MODEL, messages=[{"role": "user", "content": "部署"}], tools=tools(nonce + choice[0]), tool_choice=choice,
                    parallel_tool_calls=False, max_tokens=60, temperature=0, stream=True)
        a = one(body); time.sleep(8); b = one(body)
        for tag, v in (("first", a), ("again", b)):
            res.setdefault((choice, tag), []).append(v)
        print(choice, "first", ["%.3f" % x if x else None for x in a], "again", ["%.3f" % x if x else None for x in b], flush=True)
for key, vs in res.items():
    print(key, "TTFT p50 %.3f  first call chunk p50 %.3f  total p50 %.3f" % tuple(statistics.median([v[i] for v in vs if v[i] is not None] or [float('nan')]) for i in range(3)))
