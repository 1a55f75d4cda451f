"""Chat completions through the official `openai` client, against OpenAI or any compatible server
(vLLM, Ollama, llama.cpp), with retries and a cache that makes sure no answer is paid for twice.

Every answer is appended to a JSONL cache (one line per request, flushed and fsynced) keyed by the
sha256 of model, messages and parameters; a rerun, or a run resumed after a crash, asks the server
only for what is not in the cache.
"""
import hashlib
import json
import os
import random
import threading
import time

from .config import redact


class AuthenticationFailed(Exception):
    """The server refused the key (401/403): every further request would be refused too."""


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedChat:
    """`ask(model, messages, **params)` → answer text, or None when the request failed for good.

    Only usable answers (a non-empty text) are cached. Identical requests made at the same time are sent
    once and share the answer. A malformed 200 response (not JSON, no choices) is retried like a 5xx.
    A refused key raises AuthenticationFailed at once."""

    def __init__(self, cache_path: str, base_url: str | None, api_key: str | None, timeout: float = 60.0,
                 max_retries: int = 5, retry_base_s: float = 1.0):
        import openai
        self.openai = openai
        self.client = openai.OpenAI(api_key=api_key or "not-needed", base_url=base_url, max_retries=0,
                                    timeout=timeout)
        self.url = redact(str(self.client.base_url))
        self.cache_path, self.max_retries, self.retry_base_s = cache_path, max_retries, retry_base_s
        self.lock = threading.Lock()
        self.cache, self.in_flight = {}, {}  # in_flight: key → Event set when that request is settled
        if os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.cache[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError):
                        pass  # a line cut short by a crash: that request is simply asked again
        self.requests = self.hits = self.failures = self.retries = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.unreachable = self.refused = False

    def ask(self, model: str, messages: list[dict], **params) -> str | None:
        key = cache_key(model, messages, params)
        while True:
            with self.lock:
                if key in self.cache:
                    self.hits += 1
                    return self.cache[key]["answer"]
                if self.unreachable or self.refused:
                    return None
                waiting = self.in_flight.get(key)
                if waiting is None:
                    self.in_flight[key] = threading.Event()
                    break
            waiting.wait()  # the same request is under way: its answer (or failure) is ours too
            with self.lock:
                if key not in self.cache:
                    return None
        try:
            return self._ask(key, model, messages, params)
        finally:
            with self.lock:
                self.in_flight.pop(key).set()

    def _ask(self, key: str, model: str, messages: list[dict], params: dict) -> str | None:
        retryable = (self.openai.RateLimitError, self.openai.APITimeoutError, self.openai.APIConnectionError,
                     self.openai.InternalServerError, self.openai.APIResponseValidationError, json.JSONDecodeError,
                     MalformedResponse)
        for attempt in range(self.max_retries + 1):
            try:
                with self.lock:
                    self.requests += 1
                response = self.client.chat.completions.create(model=model, messages=messages, **params)
                answer = _answer_text(response)
                break
            except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as e:
                with self.lock:
                    self.failures += 1
                    self.refused = True
                raise AuthenticationFailed(
                    f"the LLM server at {self.url} refused the API key ({e.status_code}); set OPENAI_API_KEY to a "
                    f"valid key for that server (or unset it for a server that needs none) and rerun") from None
            except retryable as e:
                if attempt == self.max_retries:
                    with self.lock:
                        self.failures += 1
                        if isinstance(e, self.openai.APIConnectionError) and \
                                not isinstance(e, self.openai.APITimeoutError):
                            self.unreachable = True
                    return None
                with self.lock:
                    self.retries += 1
                time.sleep(self.retry_base_s * 2 ** attempt * (1 + random.random()))
            except self.openai.APIStatusError:
                with self.lock:
                    self.failures += 1
                return None  # 4xx other than 429: asking again gives the same answer
        if not answer:  # not cached: a later run asks again
            with self.lock:
                self.failures += 1
            print(f"LLM: {model} at {self.url} gave an empty answer; not cached, counted as failed", flush=True)
            return None
        usage = response.usage
        entry = {"key": key, "model": model, "answer": answer,
                 "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                 "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        with self.lock:
            self.prompt_tokens += entry["prompt_tokens"]
            self.completion_tokens += entry["completion_tokens"]
            self.cache[key] = entry
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return answer

    def summary(self) -> str:
        return (f"LLM: {self.requests} requests made ({self.retries} retries, {self.failures} failed), "
                f"{self.hits} answered from the cache, {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens used")


class MalformedResponse(Exception):
    """A 200 response without a usable message."""


def _answer_text(response) -> str:
    """The first choice's text, stripped; MalformedResponse when the response has none."""
    try:
        return (response.choices[0].message.content or "").strip()
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedResponse(f"malformed response ({type(e).__name__})") from None
