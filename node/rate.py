"""``qa-node rate``: a local web page on which a rater scores CT slices 0-4 on the LDCTIQA / Delta-IQA
Likert scale; every score goes into the node's database (table ``ratings``).

The images are sampled (seeded, in random order, so series are not shown in sequence) from received
series (the node's database and store: all series, or ``--series UID ...``) or from a folder of DICOM
files. Each is rendered server-side as an 8-bit PNG in a CT window (soft tissue W400/L40 by default;
lung, bone and brain on request). The page shows the image, its number, the window and the verbal
scale, nothing from the DICOM header (no patient name, ID, dates or descriptions). Keys: 0-4 score,
S skip, U (or Backspace) undo the last score (the rating is marked withdrawn), W next window.

The server binds 127.0.0.1 unless told otherwise; the browser only ever names an image by its index
in the sampled list, never by a path.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from node import ratings as rt

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("rate_page.html")
# name -> (width, level) in HU
WINDOWS = {"soft": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (2000.0, 300.0), "brain": (80.0, 40.0)}
DEFAULT_WINDOW = "soft"
DEFAULT_SAMPLE = 50
MAX_RATER_LEN = 64


@dataclass(frozen=True)
class Item:
    path: Path
    frame: int | None
    sop_instance_uid: str | None
    series_instance_uid: str | None


def window_png(hu: np.ndarray, window: str = DEFAULT_WINDOW) -> bytes:
    """8-bit greyscale PNG of a HU slice in a named window: grey = clip((HU - (L - W/2)) / W, 0, 1) * 255."""
    from PIL import Image

    w, level = WINDOWS[window]
    g = np.clip((np.asarray(hu, dtype=np.float32) - (level - w / 2.0)) / w, 0.0, 1.0)
    img = Image.fromarray(np.round(g * 255.0).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_items(path: Path) -> list[Item]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds or str(ds.get("Modality", "CT")) != "CT":
        return []
    n = int(ds.get("NumberOfFrames") or 1)
    sop = str(ds.get("SOPInstanceUID", "")) or None
    series = str(ds.get("SeriesInstanceUID", "")) or None
    if n > 1:
        return [Item(path.resolve(), k, sop, series) for k in range(1, n + 1)]
    return [Item(path.resolve(), None, sop, series)]


def items_from_folder(folder: Path) -> list[Item]:
    """Every CT image (frame) in the DICOM files under ``folder``; unreadable files are left out (one
    line saying how many)."""
    out: list[Item] = []
    bad = 0
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            out.extend(_image_items(p))
        except Exception:  # noqa: BLE001 - not DICOM: not an image to rate
            bad += 1
    if bad:
        log.info("rate: %d file(s) under %s are not readable DICOM and are left out", bad, folder)
    return out


def items_from_store(db, data_dir: str | Path, series_uids: list[str] | None = None) -> list[Item]:
    """The images of received series (all, or those named) from the node's database and store."""
    from sqlalchemy import select

    from storage.filestore import FileStore, check_uid
    from storage.models import Instance, Series

    store = FileStore(data_dir)
    for uid in series_uids or []:
        check_uid(uid, "Series Instance UID")
    out: list[Item] = []
    with db.session() as s:
        q = select(Instance, Series.series_instance_uid).join(Series, Instance.series_id == Series.id)
        if series_uids:
            q = q.where(Series.series_instance_uid.in_(series_uids))
        for inst, series_uid in s.execute(q.order_by(Instance.id)):
            path = store.abs(inst.rel_path)
            n = int(inst.number_of_frames or 1)
            frames = range(1, n + 1) if n > 1 else [None]
            out.extend(Item(path, f, inst.sop_instance_uid, series_uid) for f in frames)
    return out


def sample_items(items: list[Item], k: int, seed: int = 0) -> list[Item]:
    """``k`` items (all when k <= 0 or k >= len) in a seeded random order."""
    rnd = random.Random(seed)
    picked = list(items) if k <= 0 or k >= len(items) else rnd.sample(items, k)
    rnd.shuffle(picked)
    return picked


class RatingSession:
    """The sampled images and the database; what the HTTP handler works on."""

    def __init__(self, db, items: list[Item]) -> None:
        self.db = db
        self.items = items
        self._lock = threading.Lock()
        self._hu: dict[int, np.ndarray] = {}

    def hu(self, i: int) -> np.ndarray:
        from analysis.volume import load_series

        with self._lock:
            if i in self._hu:
                return self._hu[i]
        it = self.items[i]
        vol = load_series([it.path])
        k = 0 if it.frame is None else [j for j, f in enumerate(vol.frame_numbers) if f == it.frame][0]
        img = np.array(vol.hu[k])
        with self._lock:
            if len(self._hu) > 16:
                self._hu.pop(next(iter(self._hu)))
            self._hu[i] = img
        return img

    def rated_by(self, rater: str) -> list[int]:
        from sqlalchemy import select

        from storage.models import Rating

        keys = {(str(it.path), it.frame): i for i, it in enumerate(self.items)}
        with self.db.session() as s:
            q = select(Rating.path, Rating.frame).where(Rating.rater == rater, Rating.withdrawn_at.is_(None))
            return sorted({keys[(p, f)] for p, f in s.execute(q) if (p, f) in keys})

    def rate(self, rater: str, i: int, score: float) -> int:
        it = self.items[i]
        return rt.add_rating(self.db, rater=rater, score=score, path=str(it.path), frame=it.frame,
                             sop_instance_uid=it.sop_instance_uid, series_instance_uid=it.series_instance_uid,
                             source="page")


class _Handler(BaseHTTPRequestHandler):
    session: RatingSession  # set on the subclass made by make_server
    server_version = "ctqa-rate"

    def log_message(self, fmt, *args):  # quiet: one debug line per request, no paths or names
        log.debug("rate: %s", fmt % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _item(self, text: str) -> int:
        i = int(text)
        if not 0 <= i < len(self.session.items):
            raise ValueError("no such image")
        return i

    def do_GET(self):  # noqa: N802
        u = urlparse(self.path)
        q = parse_qs(u.query)
        try:
            if u.path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif u.path == "/api/info":
                rater = (q.get("rater") or [""])[0][:MAX_RATER_LEN]
                self._json(200, {"n": len(self.session.items), "windows": list(WINDOWS), "default_window": DEFAULT_WINDOW,
                                 "scale": [{"score": s, "label": a, "criterion": b} for s, a, b in rt.LIKERT],
                                 "rated": self.session.rated_by(rater) if rater else []})
            elif u.path.startswith("/image/") and u.path.endswith(".png"):
                i = self._item(u.path[len("/image/"):-len(".png")])
                window = (q.get("window") or [DEFAULT_WINDOW])[0]
                if window not in WINDOWS:
                    raise ValueError(f"unknown window {window!r}")
                self._send(200, window_png(self.session.hu(i), window), "image/png")
            else:
                self._json(404, {"error": "not found"})
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - an unreadable image: one line, the page shows the error
            log.warning("rate: image cannot be shown (%s: %s)", type(exc).__name__, exc)
            self._json(500, {"error": f"image cannot be shown ({type(exc).__name__})"})

    def do_POST(self):  # noqa: N802
        u = urlparse(self.path)
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n > 10_000:
                raise ValueError("request too large")
            body = json.loads(self.rfile.read(n) or b"{}")
            rater = str(body.get("rater") or "").strip()
            if not rater or len(rater) > MAX_RATER_LEN:
                raise ValueError(f"a rater name (1-{MAX_RATER_LEN} characters) is required")
            if u.path == "/api/rate":
                i = self._item(str(body.get("item")))
                score = body.get("score")
                if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 4:
                    raise ValueError("score must be an integer 0-4")
                rid = self.session.rate(rater, i, score)
                self._json(200, {"id": rid, "item": i, "score": score})
            elif u.path == "/api/undo":
                ok = rt.withdraw_rating(self.session.db, int(body.get("id")), rater=rater)
                self._json(200 if ok else 409, {"withdrawn": ok})
            else:
                self._json(404, {"error": "not found"})
        except (ValueError, TypeError) as exc:
            self._json(400, {"error": str(exc)})


def make_server(session: RatingSession, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("RateHandler", (_Handler,), {"session": session})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    return srv


def run(db, items: list[Item], *, host: str = "127.0.0.1", port: int = 8765, sample: int = DEFAULT_SAMPLE,
        seed: int = 0, out=None) -> int:
    import sys

    out = out or sys.stdout
    if not items:
        print("qa-node rate: no CT images to rate", file=sys.stderr)
        return 1
    picked = sample_items(items, sample, seed)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("rate: serving on %s, not only this machine: anyone who reaches it can rate", host)
    srv = make_server(RatingSession(db, picked), host, port)
    print(f"rating {len(picked)} image(s) of {len({i.series_instance_uid for i in picked})} series: "
          f"open http://{host}:{srv.server_address[1]}/ (Ctrl-C to stop)", file=out, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0
