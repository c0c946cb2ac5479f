"""LLM descriptions against a tiny OpenAI-style chat server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flipsafe.errors import ConfigError, DataError, FlipsafeError
from flipsafe.textguided import DEFAULT_QUESTIONS, llm_descriptions


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        question = body["messages"][-1]["content"]
        mode = self.server.mode
        if mode == "fail_dog" and "dog" in question:
            self._send(500, b'{"error": "model overloaded"}')
        elif mode == "garbage":
            self._send(200, b'{"result": "no choices here"}')
        else:
            answer = {"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": f"ANSWER: {question}\n"}}]}
            self._send(200, json.dumps(answer).encode())

    def _send(self, code, payload):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "FLIPSAFE_LLM_BASE_URL", "FLIPSAFE_LLM_MODEL",
                "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    srv.requests, srv.mode = [], "ok"
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_answers_are_fetched_cached_and_then_served_offline(server, tmp_path):
    cache = tmp_path / "cache.json"
    d = llm_descriptions(["cat", "aquarium_fish"], base_url=server.url, model="tiny",
                         api_key="secret", cache=cache)
    assert len(DEFAULT_QUESTIONS) >= 5
    assert d == {
        "cat": [f"ANSWER: {q.replace('{}', 'cat')}" for q in DEFAULT_QUESTIONS],
        "aquarium_fish": [f"ANSWER: {q.replace('{}', 'aquarium fish')}" for q in DEFAULT_QUESTIONS],
    }
    assert d.source == "llm:tiny"
    assert len(server.requests) == 2 * len(DEFAULT_QUESTIONS)
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "tiny"
    assert first["body"]["messages"][-1] == {"role": "user",
                                             "content": DEFAULT_QUESTIONS[0].replace("{}", "cat")}

    stored = json.loads(cache.read_text())["answers"]["tiny"]
    question = DEFAULT_QUESTIONS[1].replace("{}", "cat")
    assert stored["cat"][question] == f"ANSWER: {question}"

    server.shutdown()
    server.server_close()
    again = llm_descriptions(["cat", "aquarium_fish"], base_url=server.url, model="tiny",
                             cache=cache)
    assert again == d
    # Without any endpoint configured the cache alone is enough.
    assert llm_descriptions(["aquarium_fish"], model="tiny", cache=cache) == {
        "aquarium_fish": d["aquarium_fish"]}
    # Another model is a different cache key and must ask the (now gone) endpoint.
    with pytest.raises(ConfigError, match="cannot reach"):
        llm_descriptions(["cat"], base_url=server.url, model="other", cache=cache)


def test_settings_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("FLIPSAFE_LLM_BASE_URL", server.url + "/")
    monkeypatch.setenv("FLIPSAFE_LLM_MODEL", "envmodel")
    monkeypatch.setenv("OPENAI_API_KEY", "envkey")
    d = llm_descriptions(["dog"], questions=["Describe a {}."])
    assert d == {"dog": ["ANSWER: Describe a dog."]}
    assert server.requests[0]["auth"] == "Bearer envkey"
    assert server.requests[0]["body"]["model"] == "envmodel"
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_endpoint_error_keeps_answers_already_cached(server, tmp_path):
    server.mode = "fail_dog"
    cache = tmp_path / "cache.json"
    with pytest.raises(ConfigError, match="HTTP 500.*overloaded"):
        llm_descriptions(["cat", "dog"], base_url=server.url, model="m", cache=cache)
    stored = json.loads(cache.read_text())["answers"]["m"]
    assert len(stored["cat"]) == len(DEFAULT_QUESTIONS)
    assert stored.get("dog", {}) == {}


def test_malformed_answers_and_missing_settings(server, tmp_path):
    server.mode = "garbage"
    with pytest.raises(DataError, match="OpenAI chat format"):
        llm_descriptions(["cat"], base_url=server.url, model="m")
    with pytest.raises(ConfigError, match="FLIPSAFE_LLM_MODEL"):
        llm_descriptions(["cat"], base_url=server.url)
    with pytest.raises(ConfigError, match="FLIPSAFE_LLM_BASE_URL"):
        llm_descriptions(["cat"], model="m")
    with pytest.raises(ConfigError, match="exactly once"):
        llm_descriptions(["cat"], base_url=server.url, model="m", questions=["Describe it."])
    bad_cache = tmp_path / "c.json"
    bad_cache.write_text("[1, 2")
    with pytest.raises(DataError, match="cache"):
        llm_descriptions(["cat"], base_url=server.url, model="m", cache=bad_cache)
    assert bad_cache.read_text() == "[1, 2"


def test_unreachable_endpoint_is_a_flipsafe_error(server):
    url = server.url
    server.shutdown()
    server.server_close()
    with pytest.raises(FlipsafeError, match="cannot reach"):
        llm_descriptions(["cat"], base_url=url, model="m", timeout=5)
