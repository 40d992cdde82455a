"""Opening data through fsspec: retries for transient object-storage errors, and URLs fit for logs.

fsspec and s3fs open any URL (local paths, ``s3://`` with ``endpoint_url`` for MinIO and other
S3-compatible stores, ``gs://``, ``http(s)://``); what they leave to the caller is what to do when
opening a shard fails mid-run on a dropped connection. Written here because webdataset's own
openers do not go through fsspec at all.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

log = logging.getLogger("hilum")

# Not transient: retrying cannot help, and a missing shard must be reported at once.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def redact_url(url: str) -> str:
    """The URL without user info or query string, where credentials and signatures live."""
    parts = urlsplit(url)
    if not parts.scheme or (not parts.username and not parts.password and not parts.query):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def open_with_retry(
    url: str,
    mode: str = "rb",
    storage_options: dict[str, Any] | None = None,
    attempts: int = 4,
    backoff_s: float = 0.5,
) -> Any:
    """``fsspec.open(url, mode).open()``, retrying other errors with exponential backoff."""
    for attempt in range(1, attempts):
        try:
            return fsspec.open(url, mode, **(storage_options or {})).open()
        except PERMANENT:
            raise
        except Exception as err:  # noqa: BLE001 - network and server errors come in many types
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("opening %s failed (%s: %s); retry %d/%d in %.1fs", redact_url(url), type(err).__name__,
                        err, attempt, attempts - 1, delay)
            time.sleep(delay)
    return fsspec.open(url, mode, **(storage_options or {})).open()  # the last try raises what it meets
