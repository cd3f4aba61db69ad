"""A ScriptedEngine behind the real app with the GLM-4.5 format, for the Anthropic SDK tests
(``tests/api/test_anthropic_api.py``) and Claude Code's scripted tool loop
(``tests/clients/test_claude_code.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable

import anthropic

from servers import ThreadServer

from glmserve.api.app import create_app
from glmserve.api.settings import Settings
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format


def xml_call(name: str, args: dict) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                   for k, v in args.items())
    return f"<tool_call>{name}\n{body}</tool_call>"


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class ScriptedServer(ThreadServer):
    """A uvicorn server in a thread around a ScriptedEngine with the GLM-4.5 format.
    ``script(prompt) -> output text`` decides each answer."""

    def __init__(self, settings: Settings | None = None, max_model_len: int = 4096, model: str = "glm-test") -> None:
        self.output: str | Callable[[str], str] = ""
        self.calls: list[tuple[str, GenerateParams]] = []
        """Every engine request: its prompt and params."""
        self.engine = ScriptedEngine(self._script, model_name=model, max_model_len=max_model_len)
        self.app = create_app(self.engine, get_format("glm45"), settings or Settings())
        super().__init__(self.app)

    def _script(self, prompt: str, params: GenerateParams) -> list[str]:
        self.calls.append((prompt, params))
        out = self.output(prompt) if callable(self.output) else self.output
        return pieces(out)

    def client(self, key: str = "none", **kw) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=30, **kw)

    def async_client(self, key: str = "none") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0, timeout=30)
