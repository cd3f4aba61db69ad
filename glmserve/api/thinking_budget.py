"""A thinking budget that is a promise, not a hint.

With a budget of N tokens the reasoning is generated first, on its own, for at most N tokens
and up to the format's closer (``</think>``).  If the model closed it, or the budget ran out,
the server appends the closer itself and generates the answer in a second engine request
that continues the same text, under the constraint for what follows the reasoning (the
request's tool choice or output format).  Consumers see one stream of deltas, with the
opener and closer as zero-token deltas, so the format's parser reads it like any output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from glmserve.engine.base import Delta, Engine, GenerateParams, continuation
from glmserve.formats.base import Constraint


@dataclass(frozen=True)
class BudgetPlan:
    budget: int
    opener_ids: list[int]
    opener_text: str
    closer: str
    closer_ids: list[int]
    answer_constraint: Constraint | None
    reasoning_constraint: Constraint | None = None


async def generate_with_budget(engine: Engine, prompt_ids: list[int], params: GenerateParams, request_id: str,
                               plan: BudgetPlan) -> AsyncIterator[Delta]:
    """The deltas of one choice (``params.n == 1``) whose reasoning is cut at the budget."""
    ids = prompt_ids + plan.opener_ids
    reasoning_params = replace(params, max_tokens=min(plan.budget, params.max_tokens), constraint=plan.reasoning_constraint,
                               stop=[*params.stop, plan.closer])
    current = request_id
    finished = False
    try:
        if plan.opener_text:
            yield Delta(index=0, text=plan.opener_text, num_tokens=0)
        texts: list[str] = []
        used = 0
        end: Delta | None = None
        async for d in engine.generate(ids, reasoning_params, current):
            texts.append(d.text)
            used += d.num_tokens
            if d.finish_reason is None:
                yield d
            else:
                end = d
                yield replace(d, finish_reason=None, stop_sequence=None)
        assert end is not None, "the engine ended a request without a finish reason"
        closed = end.stop_sequence == plan.closer
        spent = end.finish_reason == "length" and used < params.max_tokens
        if not (closed or spent):  # the output ended inside the reasoning (EOS, a stop, max_tokens)
            finished = True
            yield Delta(index=0, text="", num_tokens=0, finish_reason=end.finish_reason, stop_sequence=end.stop_sequence)
            return
        yield Delta(index=0, text=plan.closer, num_tokens=0)
        ids = ids + engine.encode_parts(["".join(texts)]) + plan.closer_ids
        rest = continuation(engine, ids, params, used, plan.answer_constraint)
        if rest is None:
            finished = True
            yield Delta(index=0, text="", num_tokens=0, finish_reason="length")
            return
        current = f"{request_id}-answer"
        async for d in engine.generate(ids, rest, current):
            finished = finished or d.finish_reason is not None
            yield d
    finally:
        if not finished:
            await engine.abort(current)
