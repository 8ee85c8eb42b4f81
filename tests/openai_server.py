"""A real OpenAI-compatible server for the tests: a tiny model behind FastAPI +
uvicorn on 127.0.0.1, speaking the two routes vLLM and SGLang serve that the
caption and expand backends use (GET /v1/models, POST /v1/chat/completions).

A chat whose last message holds an image_url data URL part is a caption (the tiny
Gemma 3, models/encoders/gemma.py); one of text only (a string, or text parts) is
answered by the same folder through models/encoders/instruct.py, as vLLM answers
text-only chats of a vision model. A folder without a vision tower (the tiny Qwen2)
serves text only, and answers an image with a 400.

It runs in its own process, so a test can SIGKILL it mid-stage like a crashed
GPU server. The faults it can play are options (on the command line, or changed
at run time through POST /_control): the model id it reports, 500 for the first
N chat requests or every k-th, and `die_after` (SIGKILL itself when chat request
N+1 arrives, so "killed mid-stage" happens at a known point). GET /_stats counts
the chat requests it received and answered, and keeps their bodies minus the image.

    python -m tests.openai_server --model FOLDER --model-id tiny/gemma --port 8000
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_app(model_dir: Path, state: dict):
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from PIL import Image

    from models.encoders.gemma import GemmaCaptioner
    from models.encoders.instruct import InstructModel

    torch.set_num_threads(1)  # the tests share 2 cores with the stage and other servers
    vision = "vision_config" in json.loads((Path(model_dir) / "config.json").read_text())
    captioner = GemmaCaptioner(model_dir, "cpu") if vision else None
    instruct = [] if vision else [InstructModel(model_dir, "cpu")]  # a vision model's: at its first text chat
    lock = threading.Lock()  # one generate() at a time, as one GPU would
    count = threading.Lock()  # sync routes run on a thread pool: the counters are shared
    app = FastAPI()

    def error(code: int, message: str) -> JSONResponse:
        # vLLM's error shape: {"error": {"message", "type", "code"}} (the openai client reads .message)
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": code}}, code)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": state["model_id"], "object": "model", "created": 0,
                                            "owned_by": "niche-tests", "root": str(model_dir)}]}

    @app.post("/_control")
    def control(body: dict):
        state.update(body)
        return {k: v for k, v in state.items() if k != "bodies"}

    @app.get("/_stats")
    def stats():
        return {k: state[k] for k in ("received", "answered", "bodies")}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        with count:
            state["received"] += 1
            n = state["received"]
        if state["die_after"] is not None and n > state["die_after"]:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no answer, no clean shutdown
        if n <= state["fail_first"] or (state["fail_every"] and n % state["fail_every"] == 0):
            return JSONResponse({"error": {"message": "boom: CUDA out of memory", "code": 500}}, 500)
        if body.get("model") != state["model_id"]:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        parts = body["messages"][-1]["content"]
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        if not urls:
            return complete(n, body, text)
        if captioner is None:
            return error(400, f"{state['model_id']} takes no images")
        if len(urls) != 1 or not urls[0].startswith("data:image/png;base64,"):
            return error(400, "expected one image_url part holding a data:image/png;base64 URL")
        raw = base64.b64decode(urls[0].partition(",")[2])
        try:
            image = Image.open(io.BytesIO(raw)).convert("RGB")
        except Exception as e:  # noqa: BLE001 — vLLM answers an undecodable image with a 400
            return error(400, f"cannot identify the image: {e}")
        state["bodies"].append({**body, "messages": "<image omitted>", "prompt": text,
                                "image_sha256": hashlib.sha256(raw).hexdigest()})
        temperature = body.get("temperature") or 0.0
        top_k = max(body.get("top_k", -1), 0)  # vLLM's and SGLang's "off" is -1; transformers' is 0
        with lock:
            (g,) = captioner.caption([image], text, body.get("max_tokens") or 16, temperature,
                                     body.get("top_p", 1.0), top_k, body.get("seed") or 0)
        return answer(n, g)

    def complete(n: int, body: dict, text: str):
        state["bodies"].append({**body, "prompt": text})
        temperature = body.get("temperature") or 0.0
        with lock:
            if not instruct:
                instruct.append(InstructModel(model_dir, "cpu"))
            (g,) = instruct[0].generate([text], body.get("max_tokens") or 16, temperature, body.get("top_p", 1.0),
                                        max(body.get("top_k", -1), 0), [body.get("seed") or 0])
        return answer(n, g)

    def answer(n: int, g):
        with count:
            state["answered"] += 1
        return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": state["model_id"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": "stop" if g.ended else "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": g.tokens, "total_tokens": g.tokens}}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server process; `url` is its /v1 base. Use as a context manager or call stop()."""

    def __init__(self, model_dir: Path, model_id: str, log: Path, **options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        args = [sys.executable, "-m", "tests.openai_server", "--model", str(model_dir), "--model-id", model_id,
                "--port", str(self.port), "--options", json.dumps(options)]
        self.log = log
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> "Served":
        t0 = time.monotonic()
        while True:
            try:
                self._call("GET", "/v1/models")
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"the test server did not start:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def _call(self, method: str, path: str, doc: dict | None = None) -> dict:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def control(self, **options) -> dict:
        """Change options while it runs: model_id, fail_first, fail_every, die_after; counters too."""
        return self._call("POST", "/_control", options)

    def stats(self) -> dict:
        return self._call("GET", "/_stats")

    def kill(self) -> None:
        """SIGKILL: a crashed server, connections reset, the port closed."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> "Served":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--options", default="{}", help="JSON: fail_first, fail_every, die_after")
    a = ap.parse_args()
    state = {"model_id": a.model_id, "fail_first": 0, "fail_every": 0, "die_after": None,
             "received": 0, "answered": 0, "bodies": []}
    state.update(json.loads(a.options))
    # Sync routes run on a thread pool; uvicorn's one worker keeps the counters in one process.
    uvicorn.run(make_app(a.model, state), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
