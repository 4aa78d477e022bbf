"""A small client for OpenAI-compatible chat endpoints (OpenAI, vLLM, TGI, llama.cpp servers).

Standard library only. Requests run in a bounded thread pool; time-outs, 429 and 5xx are retried
with exponential back-off; every reply is cached on disk under a hash of the full request
(model, messages, parameters), so a resumed run never pays for the same request twice. The API
key is read from the environment variable named in the config when a request is sent, and is
never logged or cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.errors import UserError
from alignment.io import atomic_write

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
_RETRIED_STATUS = (429, 500, 502, 503, 504)


@dataclass
class ClientStats:
    """Running counts: HTTP attempts sent, replies served from the cache, requests given up."""

    sent: int = 0
    cached: int = 0
    failed: int = 0


class ChatClient:
    """POST `{base_url}/chat/completions` for many conversations; one reply text (or None) each.

    Args:
        base_url: the API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
        model: the model name sent with every request.
        api_key_env: NAME of the environment variable holding the key, read at each request;
            None sends no key (a local server).
        params: extra request fields (temperature, max_tokens, ...); ALT uses temperature 0.
        timeout: seconds per HTTP attempt.
        max_retries: further attempts after a time-out, 429 or 5xx, waiting backoff * 2**i s.
        max_workers: requests in flight at once.
        cache_dir: folder of cached replies (one JSON file per request); None caches nothing.

    A request that still fails after its retries, or whose reply is not a chat completion, gives
    None (counted in `stats.failed`, logged); 401/403 and other 4xx raise a UserError at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        params: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_workers: int = 8,
        cache_dir: str | Path | None = None,
    ) -> None:
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_workers < 1:
            raise UserError("need timeout > 0, max_retries >= 0, backoff >= 0, max_workers >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.params = dict(params) if params is not None else {"temperature": 0}
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_workers = max_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats = ClientStats()
        self._lock = threading.Lock()

    def chat(self, conversations: Sequence[Sequence[Message]]) -> list[str | None]:
        """The assistant's reply to each conversation, in order.

        Identical requests are sent once (K samples of a prompt often repeat a summary).
        """
        bodies = [{"model": self.model, "messages": list(m), **self.params} for m in conversations]
        keys = [request_key(body) for body in bodies]
        unique = dict(zip(keys, bodies, strict=True))
        pool = ThreadPoolExecutor(max_workers=self.max_workers)
        try:
            answers = list(pool.map(self._complete, unique.keys(), unique.values()))
            replies = dict(zip(unique, answers, strict=True))
        finally:  # after a UserError, do not send what is still queued
            pool.shutdown(wait=True, cancel_futures=True)
        return [replies[key] for key in keys]

    def _complete(self, key: str, body: dict[str, Any]) -> str | None:
        cached = self._read_cache(key, body)
        if cached is not None:
            self._count("cached")
            return cached
        reply = self._post(body)
        path = self._cache_path(key)
        if reply is None:
            self._count("failed")
        elif path is not None:
            with atomic_write(path) as handle:
                json.dump({"request": body, "reply": reply}, handle, ensure_ascii=False)
        return reply

    def _post(self, body: dict[str, Any]) -> str | None:
        data = json.dumps(body).encode("utf-8")
        why = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=self._headers())
            self._count("sent")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                if err.code not in _RETRIED_STATUS:
                    raise self._refused(err) from None
                why = f"HTTP {err.code}"
            except (TimeoutError, http.client.HTTPException, ConnectionError) as err:
                why = type(err).__name__
            except urllib.error.URLError as err:  # connect failures; a connect time-out retries
                if not isinstance(err.reason, TimeoutError):
                    raise UserError(f"{self.url}: cannot connect ({err.reason})") from None
                why = "TimeoutError"
            else:
                return chat_reply(raw, self.url)
            log.info("%s: %s (try %d of %d)", self.url, why, attempt + 1, self.max_retries + 1)
        log.warning("%s: gave up after %d tries (%s)", self.url, self.max_retries + 1, why)
        return None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise UserError(f"{self.url}: set the API key in ${self.api_key_env}")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _refused(self, err: urllib.error.HTTPError) -> UserError:
        detail = " ".join(err.read().decode("utf-8", "replace").split())[:300]
        if err.code in (401, 403):
            where = (
                f"check the key in ${self.api_key_env}"
                if self.api_key_env
                else "no key was sent (api_key_env is unset)"
            )
            return UserError(f"{self.url}: HTTP {err.code}, the key was refused: {where}")
        return UserError(f"{self.url}: HTTP {err.code} for model {self.model!r}: {detail}")

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _read_cache(self, key: str, body: dict[str, Any]) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable cache entry ({err}); delete it") from err
        if entry.get("request") != body or not isinstance(entry.get("reply"), str):
            log.warning("%s: cache entry for another request; asking again", path)
            return None
        return entry["reply"]

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)


def chat_messages(user: str, system: str | None = None) -> list[Message]:
    """A conversation of one user turn, after a system turn when there is one."""
    turn: Message = {"role": "user", "content": user}
    return [{"role": "system", "content": system}, turn] if system else [turn]


def require_fields(template: str, fields: Sequence[str], what: str) -> None:
    """A template must use every field it will be filled with: a missing `{completion}` would
    have the LLM judge nothing, politely."""
    missing = [f"{{{field}}}" for field in fields if f"{{{field}}}" not in template]
    if missing:
        raise UserError(f"{what} lacks {', '.join(missing)}: {template!r}")


def request_key(body: Mapping[str, Any]) -> str:
    """sha256 of the request as canonical JSON: equal requests, and only they, share a key."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def chat_reply(raw: bytes, url: str = "") -> str | None:
    """`choices[0].message.content` of a chat-completion body; None (logged) if it has none."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        log.warning("%s: reply is not a chat completion: %r", url, raw[:200])
        return None
    return content
