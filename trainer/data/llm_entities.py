"""MedFILIP's GPT-IE (§III-A): fine-grained entities from an LLM behind an OpenAI-compatible
chat endpoint (OpenAI, vLLM, llama.cpp's server, Ollama's /v1, ...), as an alternative to the
offline rules of ``hilum.trainer.data.entities``.

The prompt comes from a file (the default asks for a JSON list of {severity, location, category}
objects, negated findings left out); the report is the user message; the reply's JSON list is
parsed and triplets without a category are dropped, as in the paper. Replies are cached on disk
by (model, prompt, report), so a re-run of an interrupted build pays only for what it had not
asked yet. Requests run concurrently, retry with exponential backoff on connection errors, 429
and 5xx, and fail with a message naming the endpoint when it stays unreachable. The API key is
read from an environment variable named in the options and never logged.

Written on urllib rather than an SDK: one POST, no new dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hilum.trainer.data.entities import Entity
from hilum.trainer.data.storage import redact_url

log = logging.getLogger("hilum.entities")

DEFAULT_PROMPT = Path(__file__).with_name("knowledge") / "entity_prompt.txt"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class UnparsedReply(ValueError):
    """The endpoint answered, but not with a JSON list of entities."""


def parse_entities(content: str) -> list[Entity]:
    """The entities of a reply: the first JSON list in it (code fences and prose around it are
    tolerated), each item an object with a category; severity and location may be missing."""
    match = re.search(r"\[.*\]", content, flags=re.S)
    if match is None:
        raise UnparsedReply(f"no JSON list in the reply: {content[:200]!r}")
    try:
        items = json.loads(match.group(0))
    except ValueError as err:
        raise UnparsedReply(f"the reply's list is not JSON ({err}): {content[:200]!r}") from None
    out: list[Entity] = []
    for item in items:
        if not isinstance(item, dict):
            raise UnparsedReply(f"a list item is not an object: {item!r}")
        fields = {k: " ".join(str(item.get(k) or "").lower().split()) for k in ("severity", "location", "category")}
        if not fields["category"]:
            continue  # MedFILIP: a triplet without a category is removed
        entity = Entity(fields["severity"], fields["location"], fields["category"], bool(item.get("uncertain", False)))
        if entity not in out:
            out.append(entity)
    return out


@dataclass(frozen=True)
class LLMExtractor:
    url: str  # the API base, e.g. http://127.0.0.1:8000/v1 (…/chat/completions is appended)
    model: str
    prompt_file: str = str(DEFAULT_PROMPT)
    api_key_env: str | None = None  # the NAME of the environment variable holding the key
    cache_dir: str | None = None
    retries: int = 4
    timeout_s: float = 60.0
    concurrency: int = 8
    backoff_s: float = 1.0

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def prompt(self) -> str:
        try:
            return Path(self.prompt_file).read_text()
        except OSError as err:
            raise FileNotFoundError(f"entity prompt file {self.prompt_file}: {err.strerror}") from None

    def _cache_file(self, prompt: str, report: str) -> Path | None:
        if not self.cache_dir:
            return None
        key = hashlib.sha256("\0".join((self.model, prompt, report)).encode()).hexdigest()
        return Path(self.cache_dir) / key[:2] / f"{key}.json"

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"the entity extractor's API key variable {self.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        where = redact_url(self.endpoint)
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - configured URL
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:
                    detail = err.read()[:300].decode(errors="replace")
                    raise RuntimeError(f"entity extractor at {where} refused the request: HTTP {err.code} {detail}") from None
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError) as err:
                problem = str(getattr(err, "reason", err))
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise UnparsedReply(f"{where} did not answer as an OpenAI-compatible chat endpoint: {err}") from None
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RuntimeError(f"entity extractor at {where} unreachable after {self.retries + 1} tries: {problem}")

    def extract(self, report: str, prompt: str | None = None) -> list[Entity]:
        prompt = self.prompt() if prompt is None else prompt
        cache = self._cache_file(prompt, report)
        if cache is not None and cache.is_file():
            return [Entity(**e) for e in json.loads(cache.read_text())]
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": report}]}).encode()
        entities = parse_entities(self._post(body))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps([e.to_dict() for e in entities]))
            tmp.replace(cache)  # whole or absent: an interrupted build never reads half a reply
        return entities

    def extract_many(self, reports: list[str]) -> list[list[Entity] | None]:
        """Every report's entities (None where the reply could not be parsed: logged, and the
        caller counts it). Connection failures that outlast the retries raise."""
        prompt = self.prompt()
        if reports:  # one request first: an unreachable endpoint fails before hundreds of threads retry
            self.extract("No acute cardiopulmonary process.", prompt)

        def one(report: str) -> list[Entity] | None:
            try:
                return self.extract(report, prompt)
            except UnparsedReply as err:
                log.warning("entity extractor: %s", err)
                return None

        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            return list(pool.map(one, reports))
