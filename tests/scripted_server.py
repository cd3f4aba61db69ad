"""A test-only server entry: the real app (``create_app``) on the scripted engine.

    python tests/scripted_server.py --port P --chat-format glm47 --program codex [--responses-db F] [--secret-file F]
        [--inspect N] [--model-alias GLOB]

Used where a real client (Codex CLI, the playground in a browser) must be driven through a conversation whose model
output is chosen by the test: the program below decides each answer from the prompt it is
given, so what the client sent back (tool output, reasoning history) shows in the answer.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmserve.api.app import Settings, create_app  # noqa: E402
from glmserve.engine.base import GenerateParams  # noqa: E402
from glmserve.engine.scripted import ScriptedEngine  # noqa: E402
from glmserve.formats import get_format  # noqa: E402
from glmserve.server_secret import from_sources  # noqa: E402

CODEX_COMMAND = "echo $((6*7)) > codex_out.txt && cat codex_out.txt"
CODEX_REASONING = "The user wants a file; I will run a command."


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def codex_program(prompt: str, params: GenerateParams) -> list[str]:
    """GLM-4.7 output for Codex's turns: first an ``exec_command`` call; once the command's
    output is in the prompt, an answer quoting it and saying whether the first turn's
    reasoning (sent back by Codex as encrypted_content) came back as history."""
    responses = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.S)
    if not responses:
        return pieces(f"{CODEX_REASONING}</think><tool_call>exec_command<arg_key>cmd</arg_key>"
                      f"<arg_value>{CODEX_COMMAND}</arg_value></tool_call>")
    numbers = re.findall(r"^\s*(\d+)\s*$", responses[-1], re.M)
    kept = "kept" if f"<think>{CODEX_REASONING}</think>" in prompt else "lost"
    return pieces(f"Done.</think>The command printed {numbers[-1] if numbers else 'nothing'}; reasoning {kept}.")


IMAGE_NOTE = re.compile(r"An image was attached here \((image/png), (\d+) bytes\), but this model reads text only")


def codex_image_program(prompt: str, params: GenerateParams) -> list[str]:
    """A Codex session that opens a picture: ``exec_command`` lists the PNGs, ``view_image``
    opens the one listed, and the answer says what the model was told in the image's place
    (glmserve's note: media type and size), so the test sees the image reached the prompt."""
    responses = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.S)
    if not responses:
        return pieces("I list the pictures.</think><tool_call>exec_command<arg_key>cmd</arg_key>"
                      "<arg_value>ls *.png</arg_value></tool_call>")
    if len(responses) == 1:
        names = re.findall(r"[\w.-]+\.png", responses[0])
        return pieces("I open it.</think><tool_call>view_image<arg_key>path</arg_key>"
                      f"<arg_value>{names[0] if names else 'missing.png'}</arg_value></tool_call>")
    note = IMAGE_NOTE.search(prompt)
    seen = f"a note for {note.group(1)} of {note.group(2)} bytes" if note else "no note"
    return pieces(f"Done.</think>I could not see the picture; I was given {seen}.")


PATCH_ADD = "*** Begin Patch\n*** Add File: notes.md\n+# 你好，世界\n+第一行\n*** End Patch\n"
PATCH_EDIT = ("*** Begin Patch\n*** Update File: notes.md\n@@\n # 你好，世界\n-第一行\n+第一行：已修改\n+第二行 \"引号\" \\ 反斜杠\n"
              "*** End Patch\n")
PATCHED = "# 你好，世界\n第一行：已修改\n第二行 \"引号\" \\ 反斜杠\n"
"""What notes.md holds once Codex applied both patches."""


def codex_patch_program(prompt: str, params: GenerateParams) -> list[str]:
    """Codex with ``apply_patch`` as a custom tool (a model catalog names the model): one call
    creates notes.md, one edits it (Chinese text, quotes, a backslash), then the answer quotes
    what Codex said of the second patch."""
    responses = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.S)
    if len(responses) < 2:
        patch = PATCH_EDIT if responses else PATCH_ADD
        return pieces(f"I patch the file.</think><tool_call>apply_patch<arg_key>input</arg_key>"
                      f"<arg_value>{patch}</arg_value></tool_call>")
    return pieces(f"Done.</think>Codex said: {responses[-1].strip()}")


PLAYGROUND_REASONING = "The user asks about the weather; I will call the tool."


def playground_program(prompt: str, params: GenerateParams) -> list[str]:
    """GLM-4.7 output for the playground's browser tests (tests/ui/): reasoning when the prompt
    opens it; a ``get_weather`` call while the turn has no tool result (arguments that break the
    schema's enum when the user wrote "invalid"); once the result is in, an answer quoting it."""
    turn = prompt.rsplit("<|user|>", 1)[-1]
    opener = f"{PLAYGROUND_REASONING}</think>" if prompt.endswith("<think>") else ""
    results = re.findall(r"<tool_response>(.*?)</tool_response>", turn, re.S)
    if results:
        return pieces(f"{opener}The tool answered: {results[-1]}. Enjoy the day!")
    if "<tools>" in prompt and "get_weather" in prompt:
        unit = "kelvin" if "invalid" in turn else "celsius"
        return pieces(f"{opener}<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                      f"<arg_key>unit</arg_key><arg_value>{unit}</arg_value></tool_call>")
    return pieces(f"{opener}Hello from the scripted engine.")


FUZZ_OUTPUT = ("The user asks about 北京.</think>Hello, 北京! "
               "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>")


def fuzz_program(prompt: str, params: GenerateParams) -> list[str]:
    """GLM-4.7 output with a bit of everything (reasoning, text, a call) for the OpenAPI fuzzing:
    whatever the request, every answer shape is built and checked against the document."""
    return pieces(FUZZ_OUTPUT, 5)


PROGRAMS = {"codex": codex_program, "codex-image": codex_image_program, "codex-patch": codex_patch_program,
            "playground": playground_program, "fuzz": fuzz_program}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chat-format", default="glm47")
    p.add_argument("--program", choices=sorted(PROGRAMS), required=True)
    p.add_argument("--responses-db", default=None)
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("--secret-file", default=None)
    p.add_argument("--model-alias", action="append", default=[], help="as glmserve serve's (e.g. '*': any name)")
    p.add_argument("--log-requests", action="store_true", help="log every request (access log and request log)")
    p.add_argument("--inspect", type=int, default=0, help="keep the last N requests for the inspector")
    a = p.parse_args()
    engine = ScriptedEngine(PROGRAMS[a.program], model_name="scripted", max_model_len=65536)
    secret = from_sources(a.secret_file) if a.secret_file else None
    settings = Settings(api_keys=a.api_key, responses_db=a.responses_db, secret=secret, inspect=a.inspect,
                        model_aliases=a.model_alias)
    app = create_app(engine, get_format(a.chat_format), settings)
    if a.log_requests:  # uvicorn's access log shows every request's status, the request log each turn
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="info" if a.log_requests else "warning")


if __name__ == "__main__":
    main()
