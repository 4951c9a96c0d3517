"""Weights files of the learned models: the checksum, the per-process cache, the published-checksum
check. Every learned model loads its file through ``load_cached`` (once per process, path, device
and file version), so there is one SHA-256 routine (``file_sha256``) and one cache.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WeightsNotInstalled(FileNotFoundError, ValueError):
    """No weights file at the configured path; ``str()`` is the reason to report beside null metrics
    (the pipeline does: the model's metrics are null with this reason, the series is still done)."""


def file_sha256(path: str | Path) -> str:
    """Lower-case hex SHA-256 of a file (the checksum written into every SR and map)."""
    with open(path, "rb") as f:  # analysis imports nothing of ours: hashlib's own chunked file digest
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Loaded:
    """A loaded weights file: what the model's ``build`` returned, and the file's identity."""

    model: Any
    sha256: str
    path: str
    device: str
    published: bool | None  # None: the model has no published checksum to compare with


_CACHE: dict[tuple, Loaded] = {}
_LOCK = threading.Lock()


def load_cached(model: str, path: str | Path, device: str, build: Callable[[Path, str], Any], *,
                missing: str, published_sha256: str | None = None) -> Loaded:
    """Load ``path`` with ``build(path, device)`` once per process per (model, path, device, file
    version). ``missing`` is the ``WeightsNotInstalled`` message when there is no file. With a
    ``published_sha256``, another checksum is used with one warning (a site's own file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotInstalled(missing)
    st = p.stat()
    key = (model, str(p.resolve()), str(device), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        sha = file_sha256(p)
        built = build(p, str(device))
        published = None if published_sha256 is None else sha == published_sha256
        if published is False:
            log.warning("%s weights %s have SHA-256 %s, not the published %s...: using them as a site's own model",
                        model, p, sha, published_sha256[:12])
        loaded = Loaded(built, sha, str(p), str(device), published)
        _CACHE[key] = loaded
        log.info("loaded %s weights %s (sha256 %s) on %s", model, p, sha[:12], device)
        return loaded


def set_torch_threads(n: int) -> None:
    """``[analysis] torch_threads``: n > 0 sets torch's CPU threads; 0 leaves torch's default."""
    if n > 0:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
