"""Chat completions from OpenAI-compatible servers (vLLM, SGLang): a pool of endpoints
serving one model, asked through the official `openai` client — image captions for the
caption stage (`caption`), text answers for the expand stage (`complete`).

Why it is built so:
- The chat-completions API is the one both vLLM and SGLang serve for vision
  models; the image goes as a base64 PNG data URL (the bucketed file's own
  bytes, not re-encoded) and the server applies the model's chat template, as
  Ollama does.
- One `openai.OpenAI` per endpoint, with the client's own retries OFF: a retry
  here must be able to go to ANOTHER endpoint, which the client cannot do. So
  connection errors, timeouts, 5xx and 429 are retried here, on the same
  endpoint, with exponential backoff; after the last one the endpoint is marked
  down for the rest of the run and the request fails over to a live one. A 4xx
  is the request's own fault: it fails that item only, with no retry.
- Every endpoint holds at most `max_in_flight` requests; a request goes to the
  live endpoint with the fewest in flight (ties: the first listed), so a slow or
  lost server does not hold back the others.
- `check` asks every endpoint which model it serves before any work: a server
  restarted with another model would otherwise write answers under the wrong
  key. An endpoint that does not answer then is skipped, not fatal; none
  answering is one clear error. Once all are down, every call fails at once with
  the same message naming them all, so a dead pool costs one wait, not one per image.
- Errors name the params section that configured the pool (`section`: caption, expand),
  so a person knows which keys to fix.
"""
from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass

from models.hub import SetupError



class ChatError(RuntimeError):
    """One request failed for its own reason (a 4xx, an answer without choices)."""


class EndpointsDown(SetupError):
    """No endpoint of the pool answers; the message names each and why."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    ended: bool  # finish_reason "stop": the model ended on its own, not at max_tokens
    tokens: int | None  # usage.completion_tokens, when the server reports it
    endpoint: str  # which server answered


class _Failed(Exception):
    """An endpoint failed all its attempts (connection, timeout, 5xx): mark it down."""


class _Endpoint:
    def __init__(self, url: str, client):
        self.url = url
        self.client = client
        self.in_flight = 0
        self.down: str | None = None  # why it is down, or None


class ChatPool:
    """Endpoints serving one model; `caption` and `complete` are thread-safe and fail over."""

    def __init__(self, endpoints: list[str] | tuple[str, ...], model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 1.0, max_in_flight: int = 8,
                 section: str = "caption"):
        import openai

        self.section = section
        self.log = logging.getLogger(f"niche.{section}")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight = max_in_flight
        # vLLM and SGLang accept any key unless started with --api-key; the client needs a non-empty one.
        key = os.environ.get(api_key_env) or "EMPTY"
        self._eps = [_Endpoint(u, openai.OpenAI(base_url=u, api_key=key, max_retries=0, timeout=timeout_s))
                     for u in endpoints]
        self._cond = threading.Condition()
        self._openai = openai

    @property
    def concurrency(self) -> int:
        """Requests the pool can have in flight at once (all endpoints together)."""
        return len(self._eps) * self.max_in_flight

    @property
    def down(self) -> str | None:
        """Why no endpoint can be used, naming each; None while one is live."""
        with self._cond:
            if any(e.down is None for e in self._eps):
                return None
            return ("no OpenAI-compatible endpoint answers: " + "; ".join(f"{e.url} ({e.down})" for e in self._eps)
                    + f". Start the server (vllm serve / sglang.launch_server) or set {self.section}.openai_endpoints.")

    def check(self) -> None:
        """Before any work: each endpoint that answers serves `model`; at least one answers."""
        for e in self._eps:
            try:
                served = self._with_retries(
                    e, lambda c: [m.id for m in c.models.list(timeout=min(self.timeout_s, 10.0))])
            except _Failed as err:
                self.log.warning("%s: skipping %s: %s", self.section, e.url, err)
                self._mark_down(e, str(err))
                continue
            except ChatError as err:
                raise SetupError(f"cannot list the models of {e.url} ({err}); "
                                 f"is it the server's /v1 base URL?") from None
            if self.model not in served:
                s = self.section
                raise SetupError(f"{e.url} serves {', '.join(map(repr, served)) or 'no model'}, but "
                                 f"{s}.openai_model expects {self.model!r}: point {s}.openai_endpoints at a "
                                 f"server of that model, or set {s}.openai_model to what it serves")
        if self.down:
            raise EndpointsDown(self.down)

    def caption(self, png: bytes, instruction: str, max_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> ChatResult:
        """One caption of one PNG; sampling knobs are sent only when sampling (temperature > 0)."""
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": instruction}]}]
        return self._chat(messages, max_tokens, temperature, top_p, top_k, seed)

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> ChatResult:
        """One answer to one text-only user message; sampling knobs as for `caption`."""
        return self._chat([{"role": "user", "content": text}], max_tokens, temperature, top_p, top_k, seed)

    # ------------------------------------------------------------ internals

    def _chat(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float, top_k: int,
              seed: int) -> ChatResult:
        """One chat completion on the least busy live endpoint, failing over until one answers."""
        kw: dict = {"max_tokens": max_tokens, "temperature": temperature}
        if temperature > 0:
            # top_k is not in OpenAI's API; vLLM and SGLang read it from the body's extra fields. Off is
            # -1 for both (SGLang refuses 0); left out, vLLM would use the model's generation_config instead.
            kw.update(top_p=top_p, seed=seed, extra_body={"top_k": top_k if top_k > 0 else -1})
        while True:  # each turn: one endpoint, all its attempts; on failure the next live one
            e = self._acquire()
            try:
                reply = self._with_retries(
                    e, lambda c: c.chat.completions.create(model=self.model, messages=messages, **kw))
            except _Failed as err:
                self._mark_down(e, str(err))
                continue
            finally:
                self._release(e)
            return _result(e.url, reply)

    def _with_retries(self, e: _Endpoint, call):
        openai = self._openai
        last = ""
        for attempt in range(self.retries + 1):
            if e.down:  # another request found it dead: do not wait out our own retries
                raise _Failed(e.down)
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                self.log.info("openai: %s: %s; retry %d/%d in %.2fs", e.url, last, attempt, self.retries, wait)
                time.sleep(wait)
            try:
                return call(e.client)
            except openai.APIStatusError as err:
                detail = _detail(err)
                if err.status_code == 401:
                    raise SetupError(f"{e.url}: HTTP 401 {detail}: put the server's key in ${self.api_key_env} "
                                     f"({self.section}.openai_api_key_env)") from None
                if err.status_code < 500 and err.status_code != 429:
                    raise ChatError(f"{e.url}: HTTP {err.status_code}: {detail}") from None
                last = f"HTTP {err.status_code}: {detail}"
            except openai.APITimeoutError:
                last = f"no answer within {self.timeout_s:g}s"
            except openai.APIConnectionError as err:
                last = f"cannot connect ({err.__cause__ or err})"
        raise _Failed(f"{self.retries + 1} attempts failed, the last with {last}")

    def _acquire(self) -> _Endpoint:
        with self._cond:
            while True:
                live = [e for e in self._eps if e.down is None]
                if not live:
                    break
                free = [e for e in live if e.in_flight < self.max_in_flight]
                if free:
                    e = min(free, key=lambda e: e.in_flight)
                    e.in_flight += 1
                    return e
                self._cond.wait()
        raise EndpointsDown(self.down)

    def _release(self, e: _Endpoint) -> None:
        with self._cond:
            e.in_flight -= 1
            self._cond.notify_all()

    def _mark_down(self, e: _Endpoint, why: str) -> None:
        with self._cond:
            if e.down is None:
                e.down = why
                live = sum(x.down is None for x in self._eps)
                self.log.warning("%s: %s is down (%s); %d of %d endpoints left", self.section, e.url, why, live,
                                 len(self._eps))
            self._cond.notify_all()  # waiters re-pick, or learn that all are down


def _result(url: str, reply) -> ChatResult:
    if not reply.choices:
        raise ChatError(f"{url}: an answer without choices")
    choice = reply.choices[0]
    usage = getattr(reply, "usage", None)
    return ChatResult(text=choice.message.content or "", ended=choice.finish_reason != "length",
                      tokens=usage.completion_tokens if usage else None, endpoint=url)


def _detail(err) -> str:
    body = err.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
        if isinstance(body, dict):
            body = body.get("message", body)
    return str(body or err.message)[:300]
