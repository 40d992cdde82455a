"""Opening data through fsspec: retries for transient object-storage errors, and URLs fit for logs.

fsspec and s3fs open any URL (local paths, ``s3://`` with ``endpoint_url`` for MinIO and other
S3-compatible stores, ``gs://``, ``http(s)://``); what they leave to the caller is what to do when
opening a shard, or reading it half-way, fails on a dropped connection. Written here because
webdataset's own openers do not go through fsspec at all.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec

log = logging.getLogger("hilum")
T = TypeVar("T")

# Not transient: retrying cannot help, and a missing shard must be reported at once.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# Option names that hold credentials (s3fs `key`/`secret`/`token`, gcsfs `token`, adlfs
# `account_key`/`sas_token`, HTTP `password` ...). In a config they must be written as references
# to environment variables, ``${NAME}``, so that a saved or printed config never holds a secret.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_secret_option(name: str) -> bool:
    n = name.lower()
    return n == "key" or n.endswith("_key") or n.endswith("key_id") or any(w in n for w in _SECRET_WORDS)


def literal_secrets(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of credential options given as literal values rather than ``${ENV}`` references."""
    found = []
    if isinstance(options, dict):
        for name, value in options.items():
            where = f"{prefix}.{name}" if prefix else str(name)
            if isinstance(value, (dict, list)):
                found += literal_secrets(value, where)
            elif is_secret_option(str(name)) and isinstance(value, str) and value and not _ENV_REF.fullmatch(value):
                found.append(where)
    elif isinstance(options, list):
        for i, value in enumerate(options):
            found += literal_secrets(value, f"{prefix}.{i}")
    return found


def resolve_env_refs(options: Any, where: str = "storage_options") -> Any:
    """``options`` with every ``${NAME}`` replaced by the environment variable's value.

    Resolved where the options are used (each worker), never stored: the run's saved config keeps
    the reference.
    """
    if isinstance(options, dict):
        return {k: resolve_env_refs(v, f"{where}.{k}") for k, v in options.items()}
    if isinstance(options, list):
        return [resolve_env_refs(v, f"{where}.{i}") for i, v in enumerate(options)]
    if isinstance(options, str) and "${" in options:
        def value(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                raise ValueError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]

        return _ENV_REF.sub(value, options)
    return options


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's ``url_to_fs`` with environment references in the options resolved."""
    return fsspec.core.url_to_fs(url, **resolve_env_refs(storage_options or {}))


def redact_url(url: str) -> str:
    """The URL without user info or query string, where credentials and signatures live."""
    parts = urlsplit(url)
    if not parts.scheme or (not parts.username and not parts.password and not parts.query):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def with_retry(call: Callable[[], T], what: str, attempts: int = 4, backoff_s: float = 0.5) -> T:
    """``call()``, retried with exponential backoff on errors that may be transient.

    ``what`` names the object in the log (redact URLs before passing them). Permanent errors
    (a missing file, no permission) are raised at once; the last attempt raises what it meets.
    """
    for attempt in range(1, attempts):
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as err:  # noqa: BLE001 - network and server errors come in many types
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__, err, attempt,
                        attempts - 1, delay)
            time.sleep(delay)
    return call()


def open_with_retry(
    url: str,
    mode: str = "rb",
    storage_options: dict[str, Any] | None = None,
    attempts: int = 4,
    backoff_s: float = 0.5,
) -> Any:
    """``fsspec.open(url, mode).open()``, retrying other errors with exponential backoff."""
    options = resolve_env_refs(storage_options or {})
    return with_retry(lambda: fsspec.open(url, mode, **options).open(), f"opening {redact_url(url)}", attempts, backoff_s)


class RetryingReader(io.RawIOBase):
    """A read-only stream that survives a dropped connection mid-file.

    A read that fails with a non-permanent error closes the file, waits (exponential backoff),
    reopens it and seeks back to the byte it had reached, so a tar parser reading through it
    never notices; only when every attempt fails does the error reach the caller. Random access
    on reopen is what fsspec gives every object store (HTTP range requests).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, attempts: int = 4,
                 backoff_s: float = 0.5, start: int = 0) -> None:
        super().__init__()
        self.url, self.storage_options, self.attempts, self.backoff_s = url, storage_options, attempts, backoff_s
        self._file = open_with_retry(url, "rb", storage_options, attempts, backoff_s)
        self._offset = start  # a ranged read from here: the bytes before are never fetched
        if start:
            self._file.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        for attempt in range(1, self.attempts + 1):
            try:
                data = self._file.read(len(buffer))
                break
            except PERMANENT:
                raise
            except Exception as err:  # noqa: BLE001 - network and server errors come in many types
                if attempt == self.attempts:
                    raise
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("reading %s at byte %d failed (%s: %s); reopening, retry %d/%d in %.1fs",
                            redact_url(self.url), self._offset, type(err).__name__, err, attempt, self.attempts - 1, delay)
                time.sleep(delay)
                self._reopen()
        n = len(data)
        buffer[:n] = data
        self._offset += n
        return n

    def _reopen(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass
        self._file = open_with_retry(self.url, "rb", self.storage_options, self.attempts, self.backoff_s)
        self._file.seek(self._offset)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
