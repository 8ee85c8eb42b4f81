"""The Ollama client and the caption stage's ollama backend, against a real HTTP
server on 127.0.0.1 that speaks the two endpoints the client uses."""
import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.encoders.ollama import OllamaClient, OllamaError, OllamaUnreachable
from tasks.bucket import BucketParams, bucket
from tasks.caption import FLAG_MAX_TOKENS, CaptionParams, caption
from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample
from tests.storekit import item_bytes

CANNED = "  A particle figure\n\nstands upright,   arms at its sides. "
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


class FakeOllama(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.models = ["gemma3:27b"]
        self.generate_requests: list[dict] = []
        self.fail_next = 0  # answer this many generate requests with a 500
        self.done_reason = "stop"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOllama

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/api/tags":
            self._send(200, {"models": [{"name": m, "model": m} for m in self.server.models]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/api/generate":
            return self._send(404, {"error": "not found"})
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.generate_requests.append(req)
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            return self._send(500, {"error": "boom: out of memory"})
        if req.get("model") not in self.server.models:
            return self._send(404, {"error": f"model '{req.get('model')}' not found, try pulling it first"})
        if not req.get("prompt") or not req.get("images") or req.get("stream") is not False:
            return self._send(400, {"error": "expected prompt, images and stream: false"})
        self._send(200, {"model": req["model"], "response": CANNED, "done": True,
                         "done_reason": self.server.done_reason, "eval_count": 9})


@pytest.fixture
def server():
    srv = FakeOllama()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def _client(url: str, **kw) -> OllamaClient:
    return OllamaClient(url, **{"timeout_s": 10.0, "retries": 2, "backoff_s": 0.01, **kw})


def test_generate_sends_model_prompt_and_base64_image(server):
    client = _client(server.url)
    client.check("gemma3:27b")
    res = client.generate("gemma3:27b", "Describe this image.", [PNG], {"num_predict": 50, "temperature": 0.0})
    assert res.text == CANNED and res.ended is True and res.tokens == 9
    (req,) = server.generate_requests
    assert req["model"] == "gemma3:27b" and req["prompt"] == "Describe this image." and req["stream"] is False
    assert base64.b64decode(req["images"][0]) == PNG
    assert req["options"] == {"num_predict": 50, "temperature": 0.0}


def test_a_500_is_retried(server):
    server.fail_next = 1
    res = _client(server.url).generate("gemma3:27b", "Describe.", [PNG], {})
    assert res.text == CANNED and len(server.generate_requests) == 2


def test_a_500_that_persists_fails_with_the_servers_message(server):
    server.fail_next = 10
    client = _client(server.url, retries=2)
    with pytest.raises(OllamaError, match="HTTP 500.*boom: out of memory"):
        client.generate("gemma3:27b", "Describe.", [PNG], {})
    assert len(server.generate_requests) == 3 and client.down is None


def test_a_4xx_is_not_retried(server):
    with pytest.raises(OllamaError, match="HTTP 404.*not found"):
        _client(server.url).generate("llava:7b", "Describe.", [PNG], {})
    assert len(server.generate_requests) == 1


def test_a_model_not_pulled_is_named_with_the_fix(server):
    with pytest.raises(OllamaError, match=r"no model 'llava'.*ollama pull llava"):
        _client(server.url).check("llava")
    server.models.append("llava:latest")
    _client(server.url).check("llava")  # a bare name means :latest


def test_an_unreachable_host_fails_quickly_naming_the_host(closed_port):
    host = f"http://127.0.0.1:{closed_port}"
    client = _client(host, retries=2)
    t0 = time.monotonic()
    with pytest.raises(OllamaUnreachable, match=f"{host}.*unreachable after 3 attempts"):
        client.check("gemma3:27b")
    assert time.monotonic() - t0 < 2
    # Later calls fail at once with the same message, without new attempts.
    t0 = time.monotonic()
    with pytest.raises(OllamaUnreachable, match=host):
        client.generate("gemma3:27b", "Describe.", [PNG], {})
    assert time.monotonic() - t0 < 0.05


# ---------------------------------------------------------------- the stage

@pytest.fixture
def bucketed(chdir):
    make_sample(Path("data/raw"), figures=3, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(BucketParams(buckets=((256, 256), (320, 192), (192, 320))), workers=2)
    return chdir


def _params(host: str, **kw) -> CaptionParams:
    return CaptionParams(backend="ollama", ollama_host=host, ollama_model="gemma3:27b", retries=1,
                         backoff_s=0.01, timeout_s=10.0, batch_size=2, **kw)


def test_stage_captions_through_ollama_and_reuses_without_the_server(bucketed, server, closed_port):
    report = caption(_params(server.url, trigger="TOK"), workers=2)
    rows = pq.read_table("data/manifest/caption.parquet").to_pylist()
    assert report.computed == 3 and report.failed == 0
    assert {r["text"] for r in rows} == {"TOK, A particle figure stands upright, arms at its sides."}
    buckets = {r["id"]: r for r in pq.read_table("data/manifest/bucket.parquet").to_pylist()}
    sent = {base64.b64decode(req["images"][0]) for req in server.generate_requests}
    assert sent == {item_bytes("data/derived/bucket", b["key"]) for b in buckets.values()}
    assert all(r["prompt"] == CaptionParams().instruction for r in server.generate_requests)

    # Everything is stored: a re-run needs no server at all.
    again = caption(_params(f"http://127.0.0.1:{closed_port}", trigger="TOK"), workers=2)
    assert again.computed == 0 and again.reused == 3

    # The server says it stopped at num_predict: a new setting, new captions, flagged.
    server.done_reason = "length"
    flagged = caption(_params(server.url, max_new_tokens=100), workers=2)
    assert flagged.computed == 3 and flagged.extra["flagged"][FLAG_MAX_TOKENS] == 3
    assert server.generate_requests[-1]["options"]["num_predict"] == 100


def test_stage_fails_once_and_fast_when_the_server_is_down(bucketed, closed_port):
    host = f"http://127.0.0.1:{closed_port}"
    t0 = time.monotonic()
    with pytest.raises(OllamaUnreachable, match=host):
        caption(_params(host), workers=2)
    assert time.monotonic() - t0 < 2
    assert not Path("data/manifest/caption.parquet").exists()
