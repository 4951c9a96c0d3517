"""Results back to a real PACS: Debian's Orthanc on loopback, started and stopped by the tests."""

from __future__ import annotations

import json

import pydicom
import pytest

from node.orthanc import LocalOrthanc
from tests.helpers import PHANTOM_5MM, NodeProcess, node_sql, pacs_destination, qa_node, require, require_tool, \
    storescu, wait_until, write_config

pytestmark = pytest.mark.interop

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF


def node_with_destination(tmp_path, orthanc: LocalOrthanc, dest_ae: str = "ORTHANC", **kw) -> NodeProcess:
    kw["extra"] = kw.get("extra", "") + pacs_destination(orthanc.dicom_port, ae_title=dest_ae)
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", models='["basic", "classical"]', **kw)
    return NodeProcess(cfg, tmp_path)


def outbox(node: NodeProcess) -> list[dict]:
    r = qa_node("--config", str(node.config), "outbox", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def deliveries(node: NodeProcess) -> list[tuple[str, int]]:
    """(state, attempts) of every delivery, read from the database: the cheap poll (see node_sql)."""
    return node_sql(node, "SELECT state, attempts FROM deliveries")


def outbox_when(node: NodeProcess, state: str, n: int = 3, timeout: float = 300) -> list[dict]:
    """Once the database holds ``n`` deliveries, all in ``state`` (the cheap poll), the outbox as
    `qa-node outbox --json` shows it, checked to say the same."""
    wait_until(lambda: (d := deliveries(node)) and len(d) == n and all(st == state for st, _ in d),
               timeout=timeout, interval=0.5, what=f"{n} deliveries {state}")
    rows = outbox(node)
    assert len(rows) == n and all(r["state"] == state for r in rows), rows
    return rows


def study_uid(folder) -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.name != "LICENSE")
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_sr_map_and_report_arrive_in_the_source_study(tmp_path):
    require_tool("Orthanc")
    series = require(PHANTOM_5MM)  # 28 slices: the 140 of the 1 mm series only made the analysis longer
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        node = node_with_destination(tmp_path, pacs)
        node.start()
        try:
            assert storescu(node.port, series).returncode == 0
            rows = outbox_when(node, "sent")  # delivered to Orthanc
            assert sorted(r["kind"] for r in rows) == ["pdf", "pmap", "sr"]
            found = pacs.instances_in_study(study_uid(series))
            classes = sorted(i["sop_class_uid"] for i in found)
            assert classes == sorted([SR_CLASS, PM_CLASS, PDF_CLASS])
            assert {i["sop_instance_uid"] for i in found} == {r["sop_instance_uid"] for r in rows}
            assert all(i["study_instance_uid"] == study_uid(series) for i in found)
        finally:
            node.stop()


def test_pacs_down_then_up_everything_delivered_once(tmp_path):
    require_tool("Orthanc")
    series = require(PHANTOM_5MM)
    pacs = LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc")
    node = node_with_destination(tmp_path, pacs)  # Orthanc not started: the PACS is down
    node.start()
    try:
        assert storescu(node.port, series).returncode == 0
        wait_until(lambda: (d := deliveries(node)) and len(d) == 3 and all(n >= 2 for _, n in d),
                   timeout=300, interval=0.5, what="failed delivery attempts")
        rows = outbox(node)
        assert len(rows) == 3 and all(r["attempts"] >= 2 for r in rows)
        assert all(r["state"] == "pending" and "connect" in (r["last_error"] or "") for r in rows)
        # restart the node while results are pending: nothing is lost
        node.stop()
        node.start()
        assert {r["id"] for r in outbox(node)} == {r["id"] for r in rows}
        pacs.start()
        try:
            done = outbox_when(node, "sent", timeout=120)  # delivered after the PACS came back
            found = pacs.instances_in_study(study_uid(series))
            assert len(found) == 3
            assert sorted(r["sop_instance_uid"] for r in done) == sorted(i["sop_instance_uid"] for i in found)
            stats = pacs.get("/statistics")
            assert stats["CountInstances"] == 3
            # a resend request never re-sends what was acknowledged
            r = qa_node("--config", str(node.config), "resend", "--pending", cwd=tmp_path)
            assert r.returncode == 0 and r.stdout.startswith("0 deliveries")
        finally:
            pacs.cleanup()
    finally:
        node.stop()


def test_permanent_refusal_goes_to_dead_letter_and_resend(tmp_path):
    require_tool("Orthanc")
    series = require(PHANTOM_5MM)
    # a wrong called AE title for the PACS: Orthanc rejects the association (a permanent refusal)
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        node = node_with_destination(tmp_path, pacs, dest_ae="NOTORTHANC")
        node.start()
        try:
            assert storescu(node.port, series).returncode == 0
            rows = outbox_when(node, "dead", timeout=120)  # dead letters
            assert all("rejected" in r["last_error"] for r in rows)
            before = {r["id"]: r["attempts"] for r in rows}
            r = qa_node("--config", str(node.config), "resend", "--dead", cwd=tmp_path)
            assert r.returncode == 0 and r.stdout.startswith("3 deliveries")
            # each dead delivery is tried once more (the PACS still rejects us) and is dead again
            wait_until(lambda: (d := deliveries(node)) and sorted(n for st, n in d if st == "dead") == sorted(
                n + 1 for n in before.values()), timeout=60, interval=0.5, what="the resent deliveries tried again")
            again = outbox(node)
            assert all(x["state"] == "dead" and x["attempts"] == before[x["id"]] + 1 for x in again)
            assert {x["id"] for x in again} == set(before)
            assert all("rejected" in x["last_error"] for x in again)
            assert pacs.instances_in_study(study_uid(series)) == []
        finally:
            node.stop()
