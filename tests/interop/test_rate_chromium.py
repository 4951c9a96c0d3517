"""The rating page (``qa-node rate``) driven in headless Debian Chromium through the DevTools protocol
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4, so no
websocket library is needed). Real key presses (Input.dispatchKeyEvent) go through the page's own
JavaScript: the rater's name typed into the form, scores 3 and 1 by keys, S to skip, U to undo the 1,
then 4 by key and 0 by a click. Checked: the database holds exactly those ratings (rater, score, SOP
Instance UID, path; the undone one withdrawn), ``qa-node ratings export`` writes them, the page and
its JSON never carry the patient's name or ID, and the PNG is the soft-tissue window of the HU.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node import rate, ratings
from storage.db import Database
from tests.helpers import WG04, qa_node, require, write_config

pytestmark = pytest.mark.interop

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
PATIENT_NAME = "Testpatient^Jane"
PATIENT_ID = "PID-98765"


class Cdp:
    """A minimal DevTools client over Chromium's --remote-debugging-pipe."""

    def __init__(self, tmp: Path) -> None:
        r_cmd, w_cmd = os.pipe()  # we write commands -> chromium reads fd 3
        r_evt, w_evt = os.pipe()  # chromium writes fd 4 -> we read
        # the child's ends above fd 10 first, so that dup2 onto 3 and 4 cannot overwrite one of them
        hi_r, hi_w = fcntl.fcntl(r_cmd, fcntl.F_DUPFD, 10), fcntl.fcntl(w_evt, fcntl.F_DUPFD, 10)
        os.close(r_cmd)
        os.close(w_evt)
        r_cmd, w_evt = hi_r, hi_w

        def _fds():  # in the child: our pipe ends become fds 3 and 4 (kept open: they are in pass_fds)
            os.dup2(r_cmd, 3)
            os.dup2(w_evt, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={tmp / 'profile'}",
             "--window-size=1200,900", "about:blank"],
            preexec_fn=_fds, pass_fds=(r_cmd, w_evt, 3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(r_cmd)
        os.close(w_evt)
        self.w = os.fdopen(w_cmd, "wb", buffering=0)
        self.r = os.fdopen(r_evt, "rb", buffering=0)
        self.buf = b""
        self.next_id = 0
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no DevTools message")
            chunk = self.r.read(65536)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe: {self.proc.stderr.read()[-2000:]!r}")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page exception: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval(expr):
                return
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expr}")

    def key(self, key: str) -> None:
        code = f"Digit{key}" if key.isdigit() else ("Key" + key.upper() if len(key) == 1 else key)
        vk = ord(key.upper()) if len(key) == 1 else {"Enter": 13, "Backspace": 8}[key]
        text = key if len(key) == 1 else ("\r" if key == "Enter" else "")
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": key, "code": code, "text": text,
                                             "windowsVirtualKeyCode": vk})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk})

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:  # noqa: BLE001 - it is going away anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, list[str]]:
    require(WG04)
    d = tmp_path / "images"
    d.mkdir()
    uids = []
    series = generate_uid()
    for k, name in enumerate(("CT1_UNC", "CT2_UNC", "CT1_UNC")):
        ds = pydicom.dcmread(WG04 / name)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.save_as(d / f"im{k}.dcm")
        uids.append(str(ds.SOPInstanceUID))
    return d, uids


def test_png_is_the_soft_tissue_window(folder):
    from PIL import Image

    from analysis.volume import load_series

    d, _ = folder
    hu = load_series([d / "im0.dcm"]).hu[0]
    png = Image.open(io.BytesIO(rate.window_png(hu, "soft")))
    g = np.asarray(png)
    assert png.mode == "L" and g.shape == hu.shape
    expect = np.round(np.clip((hu + 160.0) / 400.0, 0, 1) * 255)
    assert np.array_equal(g, expect.astype(np.uint8))
    assert (g[hu < -160] == 0).all() and (g[hu > 240] == 255).all()


def test_rating_on_the_page_lands_in_the_database_and_export(tmp_path, folder):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    d, uids = folder
    (tmp_path / "data").mkdir()
    db_path = tmp_path / "data" / "ctqa.sqlite"  # where write_config puts the node's database
    db = Database("sqlite:///" + str(db_path))
    db.create_all()
    items = rate.sample_items(rate.items_from_folder(d), 0, seed=1)
    assert len(items) == 3
    srv = rate.make_server(rate.RatingSession(db, items))
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cdp = Cdp(tmp_path)
    try:
        cdp.open(base + "/")
        cdp.wait("document.body && document.body.dataset.state === 'login'")
        cdp.eval("document.getElementById('rater').focus()")
        cdp.call("Input.insertText", {"text": "Dr Rater"})
        cdp.key("Enter")
        cdp.wait("document.body.dataset.state === 'ready'")
        assert cdp.eval("document.getElementById('img').naturalWidth") == 512
        text = cdp.eval("document.body.innerText")
        for s, label, crit in ratings.LIKERT:
            assert label in text and crit in text
        cdp.key("3")  # item 0 -> 3
        cdp.wait("document.body.dataset.state === 'ready' && document.getElementById('progress').textContent.startsWith('Image 2')")
        cdp.key("s")  # item 1 skipped
        cdp.wait("document.getElementById('progress').textContent.startsWith('Image 3')")
        cdp.wait("document.body.dataset.state === 'ready'")
        cdp.key("1")  # item 2 -> 1 ...
        cdp.wait("document.body.dataset.state === 'finished'")
        cdp.key("u")  # ... undone: back to item 2
        cdp.wait("document.body.dataset.state === 'ready' && document.getElementById('progress').textContent.startsWith('Image 3')")
        cdp.key("4")  # item 2 -> 4
        cdp.wait("document.body.dataset.state === 'finished'")
        cdp.key("u")  # withdraw the 4, then score by clicking the "0" button
        cdp.wait("document.body.dataset.state === 'ready'")
        cdp.eval("document.querySelector('button[data-score=\"0\"]').click()")
        cdp.wait("document.body.dataset.state === 'finished'")
        html = cdp.eval("document.documentElement.outerHTML")
        info = urllib.request.urlopen(base + "/api/info?rater=Dr%20Rater").read().decode()
    finally:
        cdp.close()
        srv.shutdown()
        srv.server_close()
    for blob in (html, info):
        assert "Testpatient" not in blob and PATIENT_ID not in blob and "Jane" not in blob
    assert json.loads(info)["rated"] == [0, 2]
    from sqlalchemy import select

    from storage.models import Rating

    with db.session() as s:
        rows = [(r.rater, r.score, r.sop_instance_uid, r.path, r.withdrawn_at is not None, r.source)
                for r in s.scalars(select(Rating).order_by(Rating.id))]
    p = [str(it.path) for it in items]
    u = [it.sop_instance_uid for it in items]
    assert rows == [("Dr Rater", 3.0, u[0], p[0], False, "page"), ("Dr Rater", 1.0, u[2], p[2], True, "page"),
                    ("Dr Rater", 4.0, u[2], p[2], True, "page"), ("Dr Rater", 0.0, u[2], p[2], False, "page")]
    assert set(u) == set(uids)
    # the export, through the CLI, from the node's database
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "data")
    out = tmp_path / "export.csv"
    proc = qa_node("--config", str(cfg), "ratings", "export", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    back = ratings.read_ratings_csv(out)
    assert [(r.path, r.score, r.rater, r.sop_instance_uid) for r in back] == [
        (Path(p[0]), 3.0, "Dr Rater", u[0]), (Path(p[2]), 0.0, "Dr Rater", u[2])]
