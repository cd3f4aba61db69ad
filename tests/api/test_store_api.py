"""Two replicas of the real app (scripted engine, real HTTP, the real ``openai`` SDK) sharing
one PostgreSQL store: the Responses API answers the same whichever replica a request
lands on, ``/health`` reports the store, and a database that goes away mid-run gives clear
503s in the Responses error shape (never a response reported stored that was not), then
recovery without a restart.  The same on real vLLM replicas: tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

KEYS = ["key-one", "key-two"]
TIMEOUT = 1.0  # --responses-db-timeout of these replicas


def turns(prompt: str, params: Any) -> list[str]:
    """The answer says how many user turns the prompt holds (so the history shows)."""
    n = len(re.findall(r"<\|user\|>", prompt))
    text = f"Counting.</think>turns={n}"
    return [text[i:i + 3] for i in range(0, len(text), 3)]


class Replica(ThreadServer):
    def __init__(self, url: str) -> None:
        self.engine = ScriptedEngine(turns, model_name="m")
        super().__init__(create_app(self.engine, get_format("glm47"),
                                    Settings(api_keys=KEYS, responses_db=url, responses_db_timeout=TIMEOUT)))

    def client(self, key: str = KEYS[0]) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def replicas(postgres):
    url = postgres.fresh_database("store_api")
    a, b = Replica(url), Replica(url)
    yield a, b
    a.stop()
    b.stop()


def test_replicas_share_chains_get_and_delete(replicas):
    a, b = replicas
    r1 = a.client().responses.create(model="m", input="one")
    r2 = b.client().responses.create(model="m", input="two", previous_response_id=r1.id)
    r3 = a.client().responses.create(model="m", input="three", previous_response_id=r2.id)
    assert (r1.output_text, r2.output_text, r3.output_text) == ("turns=1", "turns=2", "turns=3")
    assert b.client().responses.retrieve(r3.id).model_dump() == r3.model_dump()
    assert a.client().responses.retrieve(r2.id).model_dump() == r2.model_dump()
    for replica in (a, b):  # the other key sees none of it, on either replica
        with pytest.raises(openai.NotFoundError):
            replica.client(KEYS[1]).responses.retrieve(r1.id)
        with pytest.raises(openai.BadRequestError) as e:
            replica.client(KEYS[1]).responses.create(model="m", input="x", previous_response_id=r3.id)
        assert e.value.code == "previous_response_not_found"
    a.client().responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        b.client().responses.retrieve(r1.id)
    with pytest.raises(openai.BadRequestError, match="deleted or expired"):
        b.client().responses.create(model="m", input="four", previous_response_id=r3.id)


def test_health_reports_the_store(replicas):
    for replica in replicas:
        r = httpx.get(replica.url + "/health")
        assert r.status_code == 200 and r.json()["store"] == "ok"


def _stream_events(replica: Replica, **kw: Any) -> list[Any]:
    with replica.client().responses.create(model="m", stream=True, **kw) as stream:
        return list(stream)


def test_database_down_mid_run_then_back(replicas, postgres):
    a, b = replicas
    kept = a.client().responses.create(model="m", input="before")
    postgres.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            b.client().responses.create(model="m", input="while down")
        assert time.monotonic() - t0 < 3 * TIMEOUT + 3
        assert e.value.status_code == 503 and e.value.code == "store_unavailable"
        assert e.value.body["type"] == "service_unavailable" and e.value.response.headers["retry-after"]
        events = _stream_events(a, input="streamed while down")
        assert events[-1].type == "response.failed" and events[-1].response.error.code == "store_unavailable"
        assert not any(ev.type == "response.completed" for ev in events)  # never reported stored
        failed_id = events[-1].response.id
        for replica in (a, b):
            with pytest.raises(openai.APIStatusError) as e:
                replica.client().responses.retrieve(kept.id)
            assert e.value.status_code == 503
            with pytest.raises(openai.APIStatusError) as e:
                replica.client().responses.create(model="m", input="x", previous_response_id=kept.id)
            assert e.value.status_code == 503
            h = httpx.get(replica.url + "/health", timeout=30)
            assert h.status_code == 503 and h.json()["error"]["code"] == "store_unavailable"
            assert "127.0.0.1" not in h.text  # the database's address stays in the log
        # a stateless request needs no database
        assert a.client().responses.create(model="m", input="stateless", store=False).output_text == "turns=1"
    finally:
        postgres.start()
    for replica in (a, b):  # back without a restart
        assert httpx.get(replica.url + "/health", timeout=30).status_code == 200
    assert b.client().responses.retrieve(kept.id).model_dump() == kept.model_dump()  # nothing acknowledged lost
    with pytest.raises(openai.NotFoundError):
        a.client().responses.retrieve(failed_id)  # the failed stream was not stored
    after = b.client().responses.create(model="m", input="after", previous_response_id=kept.id)
    assert after.output_text == "turns=2"
    events = _stream_events(a, input="streamed after", previous_response_id=after.id)
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "turns=3"
