"""The LLM client under faults: malformed and empty answers, a refused key, identical requests at once,
credentials in the server URL."""
import json
import threading

import pytest

from fake_openai import DESCRIPTION, FakeOpenAI
from sae.llm import AuthenticationFailed, CachedChat, redact

ASK = [{"role": "user", "content": "what property do these share?"}]


def body(content) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def chat(tmp_path, url, **kw):
    return CachedChat(str(tmp_path / "cache.jsonl"), url, None, timeout=10, max_retries=3, retry_base_s=0.01, **kw)


def test_malformed_200_responses_are_retried(tmp_path, server):
    server.bodies = [b"this is not json", json.dumps({"id": "c", "choices": []}).encode()]
    c = chat(tmp_path, server.url)
    assert c.ask("m", ASK) == DESCRIPTION
    assert len(server.log) == 3 and c.retries == 2 and c.failures == 0


def test_empty_and_null_answers_are_not_cached(tmp_path, server):
    server.bodies = [body(""), body(None)]
    c = chat(tmp_path, server.url)
    assert c.ask("m", ASK) is None and c.ask("m", ASK) is None and c.failures == 2
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""
    again = chat(tmp_path, server.url)  # a rerun against a working server asks again
    assert again.ask("m", ASK) == DESCRIPTION and again.hits == 0 and len(server.log) == 3


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_at_the_first_request(tmp_path, server, status):
    server.failures = [status] * 5
    c = chat(tmp_path, server.url)
    with pytest.raises(AuthenticationFailed, match=f"the LLM server at {server.url}/ refused the API key"):
        c.ask("m", ASK)
    assert c.ask("m", [{"role": "user", "content": "another"}]) is None, "no further request is sent"
    assert len(server.log) == 1


def test_identical_requests_in_flight_are_sent_once(tmp_path, server):
    server.delay = 0.3
    c = chat(tmp_path, server.url)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(c.ask("m", ASK))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [DESCRIPTION] * 8 and len(server.log) == 1 and c.requests == 1


def test_credentials_in_the_url_are_redacted(tmp_path, server):
    assert redact("http://user:secret@host:8000/v1") == "http://***@host:8000/v1"
    assert redact("http://host:8000/v1") == "http://host:8000/v1"
    c = chat(tmp_path, server.url.replace("http://", "http://user:secret@"))
    assert "secret" not in c.url and c.ask("m", ASK) == DESCRIPTION
