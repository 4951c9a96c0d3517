"""The node's own pipeline in process, without the network: ingest -> completion -> worker ->
results in the database -> SR, Parametric Map and PDF written and queued. The SR read back equals
the database, field by field; a re-analysis supersedes results and re-creates the same objects."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.config import settings_from_dict
from node.service import Node
from reports.sr import read_measurement_report
from scp.ingest import Ingestor
from storage.models import AnalysisRun, Delivery, Job, OutputObject, SeriesMetric, SliceMetric
from storage.repo import complete_due_series
from tests.helpers import PHANTOM_5MM, require


TRENDS = {"baseline_n": 10, "baseline_min_days": 5, "series_per_point": 1, "early_action_min_series": 0,
          "limits": {"ctdivol_mgy": {"tolerance": 20.0, "action": 35.0}}}


def make_node(tmp_path, trends=None, analysis=None):
    """An in-process node (no network) with a worker; ``analysis`` replaces the [analysis] table."""
    settings = settings_from_dict({
        "node": {"data_dir": str(tmp_path / "var"), "database": f"sqlite:///{tmp_path / 'var' / 'db.sqlite'}",
                 "port": 0},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "destinations": [{"name": "PACS", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
        "analysis": analysis or {"device": "cpu", "models": ["basic", "classical"]},
        "trends": trends or TRENDS,
    }, "test.toml")
    n = Node(settings)
    n.prepare()
    from node.worker import AnalysisWorker

    n.worker = AnalysisWorker(settings, n.db, n.store, after_job=n._after_job)
    return n


@pytest.fixture
def node(tmp_path):
    return make_node(tmp_path)


def prior_history(node: Node, files, ctdivol: float, days: int = 15) -> None:
    """Earlier series of the same scanner and protocol, one a day before the phantom's scan date."""
    from datetime import timedelta

    from analysis.volume import load_series
    from node.trending import protocol_key
    from storage.trends import record_series

    vol = load_series(files[:1])
    proto = protocol_key(vol.meta.get("protocol"), vol.meta.get("series_description"), vol.meta.get("kernel"),
                         vol.meta.get("kvp"), vol.meta.get("slice_thickness_mm"))
    from scp.ingest import _acquired_at

    scan = _acquired_at(pydicom.dcmread(files[0], stop_before_pixels=True))
    rng = np.random.default_rng(1)
    with node.db.session() as s:
        for d in range(days, 0, -1):
            record_series(s, scanner="CT1", protocol=proto, size_band="unknown",
                          series_instance_uid=f"2.25.{1000 + d}", acquired_at=scan - timedelta(days=d),
                          metrics={"ctdivol_mgy": ctdivol * (1 + rng.normal(0, 0.01))})


def phantom_slices(n: int) -> list:
    """The first ``n`` slices by Instance Number (contiguous) of the shared 5 mm phantom series, for
    tests where how many slices a series has is not what is tested."""
    files = [p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I")]
    return sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))[:n]


def push_files(node: Node, files):
    ing = Ingestor(node.db, node.store)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        spool = node.store.spool / "in.dcm"
        shutil.copyfile(f, spool)
        r = ing.store_file(spool, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID),
                           transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1",
                           peer_host="127.0.0.1")
        assert r.status == 0


def run_pending(node: Node) -> int:
    from storage.repo import claim_job

    job_id = claim_job(node.db, node.worker.worker_id)
    assert job_id is not None
    node.worker.process(job_id)
    return job_id


def push_and_analyse(node: Node, files) -> int:
    """Store ``files`` as one series, complete it and run its analysis job; returns the job id."""
    push_files(node, files)
    assert len(complete_due_series(node.db, 0.0, node.models)) == 1
    job_id = run_pending(node)
    with node.db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == "done" and job.outcome == "done", job.error
    return job_id


def test_results_outputs_and_sr_equal_database(node):
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))
    from analysis.volume import load_series

    ctdi = float(np.nanmean(load_series(files).ctdivol_mgy))
    prior_history(node, files, ctdi)  # a stable history at this CTDIvol: the new series is within limits
    push_and_analyse(node, files)
    with node.db.session() as s:
        db_metrics = {m.name: m.value for m in s.scalars(
            select(SeriesMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True)))}
        outputs = {o.kind: o for o in s.scalars(select(OutputObject))}
        deliveries = s.scalars(select(Delivery)).all()
        n_slice_rows = s.query(SliceMetric).count()
    assert db_metrics["n_slices"] == len(files)
    assert sorted(outputs) == ["pdf", "pmap", "sr"]
    assert len(deliveries) == 3 and all(d.state == "pending" and d.destination == "PACS" for d in deliveries)
    assert n_slice_rows > 0
    # the SR read back: every series value equals the database value
    sr = pydicom.dcmread(node.store.abs(outputs["sr"].rel_path))
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    content = read_measurement_report(sr)
    in_sr = {m.key: m.value for m in content.series_metrics}
    expected = {k: v for k, v in db_metrics.items() if v is not None and k in in_sr}
    assert len(expected) >= 8
    for key, value in expected.items():
        assert in_sr[key] == pytest.approx(value, rel=1e-6), key
    # the series went into the scanner's trend and was evaluated: the SR says within limits
    from storage.trends import TrendPoint

    with node.db.session() as s:
        trend = {t.metric: t.value for t in s.scalars(select(TrendPoint).where(
            TrendPoint.series_instance_uid == str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)))}
    assert trend["ctdivol_mgy"] == pytest.approx(db_metrics["ctdivol_mgy"])
    evaluated = {m.key: m.evaluation for m in content.series_metrics if m.evaluation is not None}
    assert evaluated == {"ctdivol_mgy": "within"}
    # the readable report: CTDIvol beside its baseline (the history's value), "no baseline yet" elsewhere
    import shutil
    import subprocess

    from reports.readable import format_number, pdf_bytes

    if shutil.which("gs"):
        pdf = pdf_bytes(pydicom.dcmread(node.store.abs(outputs["pdf"].rel_path)))
        text = " ".join(subprocess.run(["gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite",
                                        "-sOutputFile=-", "-"], input=pdf, capture_output=True, check=True,
                                       timeout=60).stdout.decode("utf-8", "replace").split())
        import re

        want = format_number(db_metrics["ctdivol_mgy"], "mGy")
        m = re.search(rf"CTDIvol {re.escape(want)} (\S+) mGy within limits", text)
        assert m, text[:1500]
        assert float(m.group(1)) == pytest.approx(ctdi, rel=0.02)  # the history's centre, around this CTDIvol
        assert f"SSDE {format_number(db_metrics['ssde_mgy'], 'mGy')} no baseline yet" in text
    # per-slice values reference the analysed images and equal the slice rows
    with node.db.session() as s:
        wed_rows = {r.sop_instance_uid: r.value for r in s.scalars(
            select(SliceMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True), SliceMetric.name == "wed_cm"))}
    wed_sr = {m.sop_instance_uid: m.value for m in content.slice_metrics if m.key == "wed_cm"}
    assert wed_sr.keys() == wed_rows.keys() and len(wed_sr) >= len(files) - 2
    for uid in wed_sr:
        assert wed_sr[uid] == pytest.approx(wed_rows[uid], rel=1e-6)
    # the map: uint16 + Real World Value Mapping, one frame per source slice, same frame of reference,
    # at its own resolution (local SD over 6 mm: pixels of at most 3 mm; 0.49 mm source pixels -> x4)
    pm = pydicom.dcmread(node.store.abs(outputs["pmap"].rel_path))
    assert pm.NumberOfFrames == len(files) and pm.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert pm.StudyInstanceUID == src.StudyInstanceUID
    assert np.asarray(pm.pixel_array).dtype == np.uint16
    factor = src.Rows // pm.Rows
    assert factor * float(src.PixelSpacing[0]) <= 3.0 < 2 * factor * float(src.PixelSpacing[0])


def test_reanalysis_supersedes_and_recreates_the_same_objects(node):
    files = phantom_slices(8)
    push_and_analyse(node, files)
    with node.db.session() as s:
        first = {o.kind: o.sop_instance_uid for o in s.scalars(select(OutputObject))}
        job = s.scalars(select(Job)).one()
        # the same analysis run again (e.g. after a crash before the job was closed)
        job.state = "pending"
    run_pending(node)
    with node.db.session() as s:
        assert s.query(OutputObject).count() == 3  # same objects, not duplicates
        assert {o.kind: o.sop_instance_uid for o in s.scalars(select(OutputObject))} == first
        runs = s.scalars(select(AnalysisRun)).all()
        assert sum(r.current for r in runs) == 2 and len(runs) == 4  # basic + classical, twice
        current_n = s.scalar(select(SeriesMetric.value).join(AnalysisRun).where(
            AnalysisRun.current.is_(True), SeriesMetric.name == "n_slices"))
        assert current_n == len(files)


def test_a_series_reopened_by_late_slices_gets_outputs_that_name_the_ones_they_replace(node):
    """Slices arriving after a series was analysed re-open it (generation 2): its new SR, map and
    PDF are new objects whose Series Description says "analysis 2", and the SR references the first
    analysis' SR in its Predecessor Documents Sequence; the first generation's objects are unchanged."""
    files = phantom_slices(6)
    push_and_analyse(node, files[:3])
    with node.db.session() as s:
        first = {o.kind: (o.sop_instance_uid, o.rel_path) for o in s.scalars(select(OutputObject))}
    first_bytes = {k: node.store.abs(rel).read_bytes() for k, (_, rel) in first.items()}
    first_sr = pydicom.dcmread(node.store.abs(first["sr"][1]))
    assert "analysis" not in first_sr.SeriesDescription and "PredecessorDocumentsSequence" not in first_sr
    push_files(node, files[3:])  # the late slices: generation 2
    assert len(complete_due_series(node.db, 0.0, node.models)) == 1
    run_pending(node)
    with node.db.session() as s:
        rows = s.execute(select(OutputObject.kind, OutputObject.sop_instance_uid, OutputObject.rel_path, Job.generation)
                         .join(Job, Job.id == OutputObject.job_id)).all()
    second = {k: (uid, rel) for k, uid, rel, g in rows if g == 2}
    assert sorted(second) == sorted(first) == ["pdf", "pmap", "sr"]
    assert {uid for uid, _ in second.values()}.isdisjoint(uid for uid, _ in first.values())
    for k, (_, rel) in first.items():
        assert node.store.abs(rel).read_bytes() == first_bytes[k]
    for k, (_, rel) in second.items():
        ds = pydicom.dcmread(node.store.abs(rel), stop_before_pixels=True)
        assert "analysis 2, series " in ds.SeriesDescription, (k, ds.SeriesDescription)
    sr = pydicom.dcmread(node.store.abs(second["sr"][1]))
    (study_item,) = sr.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == first_sr.StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first_sr.SeriesInstanceUID
    (ref,) = series_item.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (first_sr.SOPClassUID, first_sr.SOPInstanceUID)
    assert sr.SeriesNumber == first_sr.SeriesNumber  # the same place in the study's series list


def test_series_outside_control_limits_is_flagged_in_sr_and_alert(tmp_path):
    node = make_node(tmp_path)
    files = phantom_slices(8)
    from analysis.volume import load_series

    ctdi = float(np.nanmean(load_series(files).ctdivol_mgy))
    prior_history(node, files, ctdi / 1.6)  # the history ran at a much lower dose: this series is +60 %
    push_and_analyse(node, files)
    from storage.trends import Alert

    with node.db.session() as s:
        sr_path = s.scalars(select(OutputObject).where(OutputObject.kind == "sr")).one().rel_path
        alerts = s.scalars(select(Alert)).all()
    content = read_measurement_report(pydicom.dcmread(node.store.abs(sr_path)))
    evaluated = {m.key: m.evaluation for m in content.series_metrics if m.evaluation is not None}
    assert evaluated == {"ctdivol_mgy": "outside"}
    assert any(a.metric == "ctdivol_mgy" for a in alerts)


def test_stop_requeues_the_job_the_worker_was_running(tmp_path):
    """What SIGTERM does in `qa-node serve`: Node.stop() puts the worker's unfinished job back."""
    from storage.repo import claim_job

    node = make_node(tmp_path)
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:3]
    push_files(node, files)
    complete_due_series(node.db, 0.0, node.models)
    job_id = claim_job(node.db, node.worker.worker_id)  # the worker is in the middle of this job
    node.stop()
    with node.db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == "pending" and job.worker is None
    # a later worker finishes it, and a result stored by the interrupted one would be refused
    node2 = make_node(tmp_path)
    assert run_pending(node2) == job_id
    from storage.repo import finish_job

    assert finish_job(node2.db, job_id, node.worker.worker_id, state="done", error=None) is False
    with node2.db.session() as s:
        assert s.get(Job, job_id).state == "done"


def test_serving_node_schedules_nightly_reports_and_outbox(tmp_path):
    node = make_node(tmp_path)
    node.start()
    try:
        jobs = {j.id: j for j in node.scheduler.get_jobs()}
        assert {"sweep_completed_series", "send_outbox", "ctqa-scheduled-reports"} <= set(jobs)
        trigger = str(jobs["ctqa-scheduled-reports"].trigger)
        assert "hour='2'" in trigger and "minute='0'" in trigger  # the default "0 2 * * *"
    finally:
        node.stop()


def test_an_unexpected_error_after_the_models_fails_that_job_alone(node, monkeypatch):
    """An exception outside the models (here in the finishing step of the first job) fails that job
    with its reason and writes no results or outputs for it; the worker's next job closes done."""
    import node.worker as worker_mod
    from storage.repo import claim_job

    files = phantom_slices(6)
    push_files(node, files[:3])
    # a second series: the same slices under other UIDs
    from pydicom.uid import generate_uid
    series2, tmp = generate_uid(), node.store.spool.parent / "copy"
    tmp.mkdir()
    copies = []
    for f in files[3:]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series2, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp / f.name)
        copies.append(tmp / f.name)
    push_files(node, copies)
    assert len(complete_due_series(node.db, 0.0, node.models)) == 2
    first, second = claim_job(node.db, node.worker.worker_id), claim_job(node.db, node.worker.worker_id)
    real_finish, calls = worker_mod.finish_series, []

    def finish_failing_first(prepared):
        calls.append(prepared)
        if len(calls) == 1:
            raise RuntimeError("finishing broke")
        return real_finish(prepared)
    monkeypatch.setattr(worker_mod, "finish_series", finish_failing_first)

    assert node.worker.process(first) is None
    with node.db.session() as s:
        job = s.get(Job, first)
        assert (job.state, job.outcome) == ("failed", "failed")
        assert job.error == "RuntimeError: finishing broke"
        assert s.scalars(select(OutputObject).where(OutputObject.job_id == first)).all() == []
        assert s.scalars(select(AnalysisRun).where(AnalysisRun.job_id == first)).all() == []
    result = node.worker.process(second)
    assert result is not None and result.status == "done"
    with node.db.session() as s:
        job = s.get(Job, second)
        assert (job.state, job.outcome, job.error) == ("done", "done", None)
        assert {r.model for r in s.scalars(select(AnalysisRun).where(AnalysisRun.job_id == second))} == {"basic", "classical"}
