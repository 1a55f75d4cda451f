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


class ServerUnreachable(Exception):
    """No connection could be made to the server after all retries."""


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedChat:
    """`ask(model, messages, **params)` → answer text, or None when the request failed for good."""

    def __init__(self, cache_path: str, base_url: str | None, api_key: str | None, timeout: float = 60.0,
                 max_retries: int = 5, retry_base_s: float = 1.0):
        import openai
        self.openai = openai
        self.client = openai.OpenAI(api_key=api_key or "not-needed", base_url=base_url, max_retries=0,
                                    timeout=timeout)
        self.url = str(self.client.base_url)
        self.cache_path, self.max_retries, self.retry_base_s = cache_path, max_retries, retry_base_s
        self.lock = threading.Lock()
        self.cache = {}
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
        self.unreachable = False

    def ask(self, model: str, messages: list[dict], **params) -> str | None:
        key = cache_key(model, messages, params)
        with self.lock:
            if key in self.cache:
                self.hits += 1
                return self.cache[key]["answer"]
            if self.unreachable:
                return None
        retryable = (self.openai.RateLimitError, self.openai.APITimeoutError, self.openai.APIConnectionError,
                     self.openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            try:
                with self.lock:
                    self.requests += 1
                response = self.client.chat.completions.create(model=model, messages=messages, **params)
                break
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
        answer = (response.choices[0].message.content or "").strip()
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
