"""The metaschema check of tool and response schemas: jsonschema-rs's fast verdict, jsonschema's
message for a schema it refuses (the 400 says exactly what jsonschema says)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from glmserve.api.mapping import _schema_error
from glmserve.formats import grammar

DATA = Path(__file__).resolve().parents[1] / "data" / "first-requests"

BAD = [
    {"type": "objekt"},
    {"type": "object", "properties": {"a": {"type": 5}}},
    {"items": [{"type": "string"}]},  # 2020-12: prefixItems
    {"minimum": "3"},
    {"required": "a"},
    {"$schema": "http://json-schema.org/draft-04/schema#", "exclusiveMinimum": 0},
]
GOOD = [
    {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]},
    {"$schema": "https://example.com/unknown-metaschema", "type": "object"},  # jsonschema decides
    {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},  # dangling: the constraint's business
    {"type": "string", "pattern": "(?<=a)b"},
]


def jsonschema_message(schema: dict) -> str | None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return exc.message
    return None


@pytest.mark.parametrize("schema", BAD + GOOD, ids=[json.dumps(s)[:40] for s in BAD + GOOD])
def test_the_verdict_and_message_are_jsonschemas(schema):
    grammar.clear_caches()
    assert _schema_error(json.dumps(schema)) == jsonschema_message(schema)
    assert (jsonschema_message(schema) is None) == (schema in GOOD)


def test_the_agents_tool_schemas_are_valid():
    for path in sorted(DATA.glob("*.json")):
        for tool in json.loads(path.read_text())["body"]["tools"]:
            schema = tool["function"].get("parameters", {})
            assert _schema_error(json.dumps(schema)) is None and jsonschema_message(schema) is None
