"""No silent failure: an analysed series whose outputs could not be built or written shows
``outputs: failed`` with the reason (status text and JSON, summary count, one ERROR line without
patient data); ``qa-node rebuild-outputs`` rebuilds them from the stored results or re-analyses."""

from __future__ import annotations

import json
import logging

import pydicom
import pytest
from sqlalchemy import select, text

import node.outputs
from node.cli import main
from node.config import load_settings
from node.service import Node
from node.worker import AnalysisWorker
from reports.sr import read_measurement_report
from storage.db import Database
from storage.models import Delivery, Job, OutputObject, SeriesMetric, AnalysisRun
from tests.helpers import pacs_destination, write_config
from tests.integration.test_node_pipeline import phantom_slices, push_and_analyse, run_pending


@pytest.fixture
def setup(tmp_path):
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", models='["basic", "classical"]',
                       extra=pacs_destination(4242, outbox=False))
    settings = load_settings(str(cfg))
    n = Node(settings)
    n.prepare()
    n.worker = AnalysisWorker(settings, n.db, n.store, after_job=n._after_job)
    yield n, cfg, phantom_slices(8)  # what fails here is writing the outputs, whatever the series' length
    n.db.dispose()


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def status(capsys, cfg) -> dict:
    rc, out, err = cli(capsys, "--config", str(cfg), "status", "--json")
    assert rc == 0, err
    return json.loads(out)


def outputs_of(n: Node) -> dict[str, list]:
    with n.db.session() as s:
        rows = s.scalars(select(OutputObject)).all()
        kinds: dict[str, list] = {}
        for o in rows:
            kinds.setdefault(o.kind, []).append(o)
        return kinds


def test_forced_sr_failure_is_failed_then_rebuilt_from_stored_results(setup, capsys, caplog, monkeypatch):
    n, cfg, files = setup
    src = pydicom.dcmread(files[0], stop_before_pixels=True)

    def broken(*_a, **_k):
        raise ValueError("forced builder failure")

    monkeypatch.setattr(node.outputs, "build_measurement_report", broken)
    with caplog.at_level(logging.INFO):
        job_id = push_and_analyse(n, files)  # the analysis itself is done
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert errors[0].name == "node.service" and errors[0].exc_info is None  # one line, no traceback
    assert "outputs failed" in line and "no measurement report (SR)" in line and "forced builder failure" in line
    assert str(src.PatientID) not in line and str(src.PatientName) not in line
    with n.db.session() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.outcome, job.outputs) == ("done", "done", "failed")
        assert "sr: ValueError: forced builder failure" in job.outputs_error
    # the map and the PDF were still written and queued; the SR was not
    first = outputs_of(n)
    assert sorted(first) == ["pdf", "pmap"]
    first_bytes = {k: n.store.abs(v[0].rel_path).read_bytes() for k, v in first.items()}

    doc = status(capsys, cfg)
    (row,) = doc["series"]
    assert row["series_instance_uid"] == str(src.SeriesInstanceUID)
    assert row["job"]["state"] == "done" and row["outputs"] == "failed"
    assert "forced builder failure" in row["outputs_error"]
    assert doc["outputs"] == {"failed": 1}
    rc, out, _ = cli(capsys, "--config", str(cfg), "status")
    assert rc == 0
    series_line = next(ln for ln in out.splitlines() if ln.startswith(str(src.SeriesInstanceUID)))
    assert " failed  (" in series_line and "forced builder failure" in series_line
    assert "outputs: failed 1  <- 1 series without results in PACS" in out

    # rebuild from the stored results (the builder works again): no model runs
    monkeypatch.undo()
    import analysis.classical

    def no_model(*_a, **_k):
        raise AssertionError("a rebuild must not run the models")

    monkeypatch.setattr(analysis.classical, "run", no_model)
    rc, out, err = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--failed")
    assert rc == 0, out + err
    assert f"{src.SeriesInstanceUID}  outputs written" in out
    assert "1 of 1 series rebuilt from stored results and queued for PACS" in out
    kinds = outputs_of(n)
    assert sorted(kinds) == ["pdf", "pmap", "sr"] and all(len(v) == 1 for v in kinds.values())
    # what was already written is kept as it was (same UID, same bytes), never rewritten or queued twice
    for k in ("pdf", "pmap"):
        assert kinds[k][0].id == first[k][0].id
        assert n.store.abs(kinds[k][0].rel_path).read_bytes() == first_bytes[k]
    with n.db.session() as s:
        assert s.get(Job, job_id).outputs == "written"
        deliveries = s.scalars(select(Delivery)).all()
        assert len(deliveries) == 3 and {d.state for d in deliveries} == {"pending"}
        db_metrics = {m.name: m.value for m in s.scalars(
            select(SeriesMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True)))}
    # the rebuilt SR carries the stored values, field by field
    sr = pydicom.dcmread(n.store.abs(kinds["sr"][0].rel_path))
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    in_sr = {m.key: m.value for m in read_measurement_report(sr).series_metrics}
    assert len(in_sr) >= 8
    for key, value in in_sr.items():
        assert value == pytest.approx(db_metrics[key], rel=1e-6), key
    doc = status(capsys, cfg)
    assert doc["series"][0]["outputs"] == "written" and doc["outputs"] == {"written": 1}
    # nothing failed any more
    rc, out, _ = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--failed")
    assert rc == 0 and out.strip() == "no series with failed outputs"


def test_unwritable_outputs_fail_and_rebuild_says_maps_need_reanalyse(setup, capsys, caplog, monkeypatch):
    n, cfg, files = setup

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(n.store, "write_bytes", disk_full)
    with caplog.at_level(logging.INFO):
        job_id = push_and_analyse(n, files)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"series {_series_uid(n)}: outputs failed: outputs not written: "
                      "OSError: [Errno 28] No space left on device"]
    assert outputs_of(n) == {}
    row = status(capsys, cfg)["series"][0]
    assert row["outputs"] == "failed" and "No space left on device" in row["outputs_error"]
    monkeypatch.undo()
    uid = _series_uid(n)
    rc, out, _ = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--series", uid)
    assert rc == 0
    assert "Parametric Maps are not stored: use --reanalyse for maps" in out
    assert sorted(outputs_of(n)) == ["pdf", "sr"]  # maps are not stored, so not rebuilt
    row = status(capsys, cfg)["series"][0]
    assert row["outputs"] == "written" and "Parametric Maps are not stored" in row["outputs_error"]

    # --reanalyse: a new analysis job, picked up by the worker; the map comes back
    rc, out, _ = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--series", uid, "--reanalyse")
    assert rc == 0 and out.startswith("1 series queued for a new analysis with basic, classical")
    row = status(capsys, cfg)["series"][0]
    assert row["job"]["state"] == "pending" and row["outputs"] == "pending"
    new_job = run_pending(n)
    assert new_job != job_id
    with n.db.session() as s:
        assert s.get(Job, new_job).outputs == "written" and s.get(Job, new_job).outputs_error is None
    assert sorted(outputs_of(n)) == ["pdf", "pmap", "sr"]
    assert status(capsys, cfg)["series"][0]["outputs"] == "written"


@pytest.mark.parametrize("raised", ["error", "limit"])
def test_a_map_failed_by_an_error_is_partial_and_retried_a_map_the_source_cannot_hold_is_not(
        setup, capsys, caplog, monkeypatch, raised):
    """A map whose builder fails by an error (a bug, a library's surprise) leaves the series'
    outputs ``partial``, named, with one ERROR line, and ``rebuild-outputs --failed --reanalyse``
    takes it again and brings the map back; a map the source cannot hold (``MapNotPossible``, e.g.
    no Frame of Reference) is a note of an otherwise ``written`` set, not retried."""
    from reports.pmap import MapNotPossible

    n, cfg, files = setup
    real = node.outputs.build_parametric_map

    def broken(*_a, **_k):
        if raised == "error":
            raise AttributeError("'Dataset' object has no attribute 'SliceThickness'")
        raise MapNotPossible("the source slices have no FrameOfReferenceUID: a Parametric Map needs a Frame of Reference")

    monkeypatch.setattr(node.outputs, "build_parametric_map", broken)
    with caplog.at_level(logging.INFO):
        push_and_analyse(n, files)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sorted(outputs_of(n)) == ["pdf", "sr"]
    row = status(capsys, cfg)["series"][0]
    assert "pmap:local_noise_sd: " in row["outputs_error"]
    rc, out, _ = cli(capsys, "--config", str(cfg), "status")
    if raised == "limit":
        assert errors == [] and row["outputs"] == "written"
        assert "outputs: written 1" in out and "<-" not in out
        rc, out, _ = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--failed")
        assert rc == 0 and out.strip() == "no series with failed outputs"
        return
    assert errors == [f"series {_series_uid(n)}: outputs partly failed: pmap:local_noise_sd not built "
                      "(an error, see the WARNING above)"]
    assert row["outputs"] == "partial" and "AttributeError: 'Dataset' object has no attribute" in row["outputs_error"]
    assert "outputs: partial 1  <- 1 series with an output missing by an error" in out
    monkeypatch.setattr(node.outputs, "build_parametric_map", real)  # the fix is installed
    rc, out, _ = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--failed", "--reanalyse")
    assert rc == 0 and out.startswith("1 series queued for a new analysis with basic, classical"), out
    run_pending(n)
    assert sorted(outputs_of(n)) == ["pdf", "pmap", "sr"]  # the same objects (same UIDs), the map now among them
    row = status(capsys, cfg)["series"][0]
    assert row["outputs"] == "written" and row["outputs_error"] is None


def _series_uid(n: Node) -> str:
    from storage.models import Series

    with n.db.session() as s:
        return s.scalars(select(Series.series_instance_uid)).one()


def test_rebuild_outputs_usage_errors(setup, capsys):
    n, cfg, files = setup
    rc, _, err = cli(capsys, "--config", str(cfg), "rebuild-outputs", "--series", "1.2.3.4")
    assert rc == 2 and err.strip() == "qa-node: no series 1.2.3.4 in the database"
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg), "rebuild-outputs"])
    assert exc.value.code == 2


def test_database_from_before_the_outputs_column_is_upgraded(tmp_path, capsys):
    """An existing database without jobs.outputs gains the columns; its finished jobs are judged by
    what they recorded in the outbox (none: failed, never "done" silently)."""
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var")
    (tmp_path / "var").mkdir()
    url = f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}"
    db = Database(url)
    db.create_all()
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN outputs"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN outputs_error"))
        conn.execute(text("INSERT INTO series (id, series_instance_uid, study_instance_uid, state, n_instances, "
                          "generation, completions, first_received_at, last_received_at) VALUES "
                          "(1, '1.2.3', '1.2', 'complete', 3, 1, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00'), "
                          "(2, '1.2.4', '1.2', 'complete', 3, 1, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO jobs (id, series_id, generation, state, models, attempts, outcome, error, "
                          "created_at) VALUES (1, 1, 1, 'done', 'basic', 1, 'done', 'outputs not written: boom', "
                          "'2026-01-01 00:00:00'), (2, 2, 1, 'done', 'basic', 1, 'skipped', 'localizer', "
                          "'2026-01-01 00:00:00')"))
    db.dispose()
    doc = status(capsys, cfg)
    rows = {r["series_instance_uid"]: r for r in doc["series"]}
    assert (rows["1.2.3"]["outputs"], rows["1.2.3"]["outputs_error"]) == ("failed", "outputs not written: boom")
    assert (rows["1.2.4"]["outputs"], rows["1.2.4"]["outputs_error"]) == ("none", None)
    db = Database(url)
    with db.engine.connect() as conn:
        cols = {r[1] for r in conn.execute(text("PRAGMA table_info(jobs)"))}
    db.dispose()
    assert {"outputs", "outputs_error"} <= cols
