"""The outbox after a long PACS outage: hundreds of queued objects for one destination reach a real
Orthanc through `qa-node serve`, each exactly once, over several bounded associations."""

from __future__ import annotations

import json
import re

import pytest

from node.orthanc import LocalOrthanc
from storage.db import Database
from storage.filestore import FileStore
from tests.helpers import NodeProcess, node_sql, pacs_destination, qa_node, queue_outbox_objects, require_tool, \
    wait_until, write_config

pytestmark = pytest.mark.interop

N = 250  # more than one page of due deliveries (200) and than two associations' worth (100 each)


def test_250_queued_objects_reach_orthanc_each_once(tmp_path):
    require_tool("Orthanc")
    var = tmp_path / "var"
    # the backlog a long outage leaves: 250 objects (SR and PDF, two transfer syntaxes) due now
    store = FileStore(var)
    store.prepare()
    db = Database(f"sqlite:///{var / 'ctqa.sqlite'}")
    db.create_all()
    uids = queue_outbox_objects(db, store, N, ["PACS"], implicit_every=4)
    db.dispose()
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        cfg = write_config(tmp_path / "config.toml", data_dir=var, extra=pacs_destination(pacs.dicom_port))
        node = NodeProcess(cfg, tmp_path)
        node.start()
        try:
            # polled in the database (a cheap read); the outbox as `qa-node outbox --json` shows it is checked
            wait_until(lambda: node_sql(node, "SELECT count(*) FROM deliveries WHERE state = 'sent'") == [(N,)],
                       timeout=240, interval=0.5, what="the backlog delivered")
            r = qa_node("--config", str(cfg), "outbox", "--json", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            rows = json.loads(r.stdout)
        finally:
            node.stop()
        assert all(x["state"] == "sent" for x in rows)
        assert len(rows) == N
        assert all(x["attempts"] == 1 and x["last_error"] is None for x in rows)  # each C-STOREd once
        # Orthanc holds exactly these N instances
        assert pacs.get("/statistics")["CountInstances"] == N
        held = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand"))
        assert held == sorted(uids)
        # over several bounded associations, never one context per object (>128 would fail)
        log = node.log()
        delivered = [(int(n), int(a)) for n, a in
                     re.findall(r"outbox: (\d+) object\(s\) delivered to PACS over (\d+) association", log)]
        assert sum(n for n, _a in delivered) == N
        assert sum(a for _n, a in delivered) >= N // 100
        assert "failed" not in log.split("ready on", 1)[1].lower()
        assert "Traceback" not in log and "skipped: maximum number of running instances" not in log
