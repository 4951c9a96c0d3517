"""Start-up reconciliation of the store with the index.

A node killed between putting an instance's file in the store and committing its index row (kill -9,
power loss) leaves a file in ``store/`` that the database does not know: never acknowledged (killed
before both its fsyncs returned: possibly incomplete), or acknowledged with its row still queued for
the group commit (``scp.ingest``). At start-up every such file is either

- **indexed**, when it is a valid instance the node would have accepted (the same header checks as a
  C-STORE: ``scp.ingest.read_instance_info``) and lies where its UIDs put it, with the same
  semantics as a received instance (``storage.repo.add_instance``: the series is created or
  re-opened, so it is completed and analysed as usual); or
- **quarantined**: moved aside into ``data_dir/quarantine/`` (not a DICOM file, truncated, a SOP
  class the node does not accept, a path that does not match its UIDs, or a SOP Instance UID indexed
  elsewhere). Quarantined files are counted by ``qa-node status``; nothing is deleted.

One log line gives the counts (no patient data); the reasons per file are logged at DEBUG.

The same runs while the node runs, narrowed, after a receiver process (``node.receivers``) died:
the series folders changed since it started, files older than a few seconds (node.receivers).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from storage.db import Database
from storage.filestore import FileStore, is_valid_uid, sha256_file
from storage.repo import StoreOutcome, add_instance, indexed_rel_paths

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    indexed: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)


def _check(store: FileStore, path: Path):
    """(InstanceInfo, rel_path) for a file the node would have accepted, else (None, reason)."""
    from pydicom.filereader import read_file_meta_info

    from scp.ingest import ACCEPTED_SOP_CLASSES, read_instance_info

    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        ts = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - anything unreadable is not an instance
        return None, "not a DICOM file"
    if sop_class not in ACCEPTED_SOP_CLASSES:
        return None, "SOP class not accepted"
    try:
        info = read_instance_info(path, affected_sop_class=sop_class, affected_sop_instance=sop_instance,
                                  transfer_syntax=ts)
    except Exception as exc:  # noqa: BLE001 - every refusal of the C-STORE checks means "not valid"
        return None, f"invalid instance ({type(exc).__name__})"
    rel = store.instance_rel_path(info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid)
    if store.abs(rel).resolve() != path.resolve():
        return None, "path does not match its UIDs"
    return info, rel


def reconcile_store(db: Database, store: FileStore, *, since: float | None = None, settle_s: float = 0.0,
                    why: str = "start-up") -> Reconciled:
    """Index or quarantine every file in the store that has no index row (see module doc).

    With ``since`` (epoch seconds; while the node runs, after a receiver process died): only the
    series folders changed since then, and only files older than ``settle_s``, so that a live
    receiver's file whose row its group commit is about to write is left to it."""
    out = Reconciled()
    known: dict[Path, set[str]] = {}
    files = store.store_files() if since is None else \
        store.store_files(series_changed_since=since, modified_before=time.time() - settle_s)
    for path in files:
        rel = str(path.relative_to(store.root))
        series_dir = path.parent
        if series_dir not in known:
            known[series_dir] = indexed_rel_paths(db, series_dir.name) if is_valid_uid(series_dir.name) else set()
        if rel in known[series_dir]:
            continue
        info, detail = _check(store, path)
        if info is not None:
            outcome, _ = add_instance(db, info, rel_path=detail, size_bytes=path.stat().st_size,
                                      sha256=sha256_file(path), scanner=None, calling_ae=None, peer_host=None)
            if outcome == StoreOutcome.STORED:
                out.indexed += 1
                known[series_dir].add(detail)
                continue
            detail = "SOP Instance UID already indexed elsewhere"
        dst = store.quarantine_file(path)
        log.debug("quarantined %s as %s: %s", rel, dst.name, detail)
        out.quarantined += 1
        out.reasons[detail] += 1
    if out.indexed or out.quarantined:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(out.reasons.items()))
        log.warning("%s reconciliation: %d file(s) in the store had no index row: %d indexed, "
                    "%d quarantined in %s%s", why, out.indexed + out.quarantined, out.indexed, out.quarantined,
                    store.quarantine, f" ({reasons})" if reasons else "")
    return out
