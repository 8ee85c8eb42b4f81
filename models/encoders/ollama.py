"""A small client for a running Ollama server's HTTP API (stdlib only).

Captions go through POST /api/generate with the image base64-encoded and
`stream: false`; Ollama applies the model's own chat template. The outside
world fails here, so this is where the retries live: connection errors and 5xx
answers are retried with exponential backoff, 4xx answers are not (they will not
get better), and a generation that times out fails its item without a retry
(the server is up, just slow; a retry would double the wait).

Once the server could not be reached after all retries, the client remembers
it and fails every later call at once with the same message naming the host, so
a dead server costs one wait, not one wait per image.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from models.hub import SetupError

log = logging.getLogger("niche.caption")

DEFAULT_HOST = "http://localhost:11434"


class OllamaError(RuntimeError):
    """The server answered, but not with a caption (unknown model, bad request, timeout)."""


class OllamaUnreachable(OllamaError, SetupError):
    """No connection to the server after all retries; the message names the host."""


@dataclass(frozen=True)
class OllamaResult:
    text: str
    ended: bool  # done_reason "stop": the model ended on its own, not at num_predict
    tokens: int | None  # eval_count, when the server reports it


@dataclass
class OllamaClient:
    host: str = DEFAULT_HOST
    timeout_s: float = 600.0  # for one generation; the reachability check uses at most 10 s
    retries: int = 3  # extra attempts after the first, on connection errors and 5xx
    backoff_s: float = 1.0  # waits backoff_s, 2*backoff_s, 4*backoff_s, ...
    _down: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def down(self) -> str | None:
        """Why the server is considered unreachable, or None."""
        return self._down

    def check(self, model: str) -> None:
        """Fail fast, before any work: the server answers and has `model` pulled."""
        tags = self._request("GET", "/api/tags", None, min(self.timeout_s, 10.0))
        want = _full_name(model)
        have = {_full_name(m.get(k, "")) for m in tags.get("models", []) for k in ("name", "model")}
        if want not in have:
            raise OllamaError(f"Ollama at {self.host} has no model {model!r}; run `ollama pull {model}` there "
                              f"(it has: {', '.join(sorted(h for h in have if h)) or 'none'})")

    def generate(self, model: str, prompt: str, images: list[bytes], options: dict) -> OllamaResult:
        body = {"model": model, "prompt": prompt, "stream": False, "options": options,
                "images": [base64.b64encode(b).decode("ascii") for b in images]}
        reply = self._request("POST", "/api/generate", body, self.timeout_s)
        if "response" not in reply:
            raise OllamaError(f"{self.host}/api/generate: no 'response' in the answer: {str(reply)[:200]}")
        return OllamaResult(text=reply["response"], ended=reply.get("done_reason", "stop") == "stop",
                            tokens=reply.get("eval_count"))

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        if self._down:
            raise OllamaUnreachable(self._down)
        url = self.host.rstrip("/") + path
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.info("ollama: %s; retry %d/%d in %.1fs", last, attempt, self.retries, wait)
                time.sleep(wait)
            req = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code < 500:
                    raise OllamaError(f"{url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code} from {url}: {detail}"
            except TimeoutError as e:
                raise OllamaError(f"{url}: no answer within {timeout:g}s ({e})") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise OllamaError(f"{url}: no answer within {timeout:g}s") from None
                last = f"cannot connect to {url}: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                last = f"connection to {url} failed: {type(e).__name__}: {e}"
            except json.JSONDecodeError as e:
                raise OllamaError(f"{url}: the answer is not JSON ({e})") from None
        if last.startswith("HTTP"):
            raise OllamaError(f"Ollama at {self.host} kept failing after {self.retries + 1} attempts: {last}")
        message = (f"Ollama server at {self.host} is unreachable after {self.retries + 1} attempts ({last}). "
                   f"Start it with `ollama serve`, or set caption.ollama_host to where it runs.")
        with self._lock:
            self._down = message
        raise OllamaUnreachable(message)


def _full_name(model: str) -> str:
    """Ollama reads a bare name as its :latest tag."""
    return model if ":" in model or not model else f"{model}:latest"


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        return e.reason or ""
    try:
        return str(json.loads(raw).get("error", raw))[:300]
    except (json.JSONDecodeError, AttributeError):
        return raw[:300]
