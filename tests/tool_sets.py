"""Tool sets several test folders send: one definition, so the parser fuzzing and the protocol
tests exercise the same tools."""

from __future__ import annotations

# Chat Completions shape: a required string, an optional integer, a Chinese description, and a
# second tool with no required field
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "天气",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                                    "days": {"type": "integer"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
                                                                     "properties": {"q": {"type": "string"}}}}},
]
