"""qa-node calibrate end to end, on SYNTHETIC ratings whose truth is known (no radiologist ratings are
on this machine): real CT slices of 4 series from the shared data, each with CT-like noise added at 5
graded levels and "rated" by its level (score = 4 - level). The global noise is calibrated against
those labels -> one row in table calibrations (the database made by an older version, without the
table, is upgraded) -> a later `qa-node analyze --json` carries global_noise_hu_likert equal to the
stored map applied to the series' global noise -> the SR built for the series, read back with pydicom
field by field, holds the Likert measurement and names the calibration. A bad ratings file or an
unknown metric: exit 2, a clear message, nothing stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.helpers import SHARED_DATA, qa_node, require, write_config

SOURCES = (  # uncompressed real slices with soft tissue (a measurable global noise); 4 series
    "corpus/dcmqi/GE_LightSpeedUltra_3slice/01.dcm",
    "corpus/dcmqi/GE_LightSpeedUltra_3slice/03.dcm",
    "corpus/cornerstone3D/GE_HiSpeedCTi_TS_LittleEndianExplicit/"
    "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm",
    "corpus/dicompyler-core/Anon_dicompyler_ct/ct.0.dcm",
    "dicom/wg04/CT1_UNC",
)
NOISE_SD_HU = (0.0, 12.0, 25.0, 45.0, 80.0)  # level 0 (as acquired, "rated" 4) ... level 4 ("rated" 0)


def _ct_noise(shape, sd, rng):
    """Gaussian noise with a ramp x Hann spectrum (a filtered-back-projection texture), SD ``sd`` HU."""
    if sd == 0:
        return np.zeros(shape)
    f = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :])
    amp = np.sqrt(f * np.where(f < 0.35, 0.5 * (1 + np.cos(np.pi * f / 0.35)), 0.0))
    n = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amp).real
    return n * (sd / n.std())


def _write_degraded(src: Path, out: Path, level: int, rng) -> str:
    ds = pydicom.dcmread(src)
    hu = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    img = np.clip(np.round(hu + _ct_noise(hu.shape, NOISE_SD_HU[level], rng)), -1024, 3071).astype(np.int16)
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
        if kw in ds:
            delattr(ds, kw)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(img, "MONOCHROME2", 16)
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.SOPInstanceUID = generate_uid()  # same SeriesInstanceUID: every level of a slice stays in its series
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return ds.SOPInstanceUID


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    for rel in SOURCES:
        require(SHARED_DATA / rel)
    root = tmp_path_factory.mktemp("calibrate")
    rated = root / "rated"
    rated.mkdir()
    rng = np.random.default_rng(3)
    lines = ["path,score,rater,sop_instance_uid"]
    files = {}
    for i, rel in enumerate(SOURCES):
        for level in range(5):
            name = f"src{i}_L{level}.dcm"
            sop = _write_degraded(SHARED_DATA / rel, rated / name, level, rng)
            lines.append(f"{name},{4 - level},synthetic,{sop}")  # SYNTHETIC label: the level, not a reader
            files[(i, level)] = rated / name
    csv = rated / "ratings.csv"
    csv.write_text("\n".join(lines) + "\n")
    data = root / "data"
    cfg = write_config(root / "config.toml", data_dir=data, models='["classical"]')
    # a database made by a version without the calibrations table
    from sqlalchemy import text

    from storage.db import Database

    data.mkdir()
    db = Database(f"sqlite:///{data}/ctqa.sqlite")
    db.create_all()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE calibrations"))
    db.dispose()
    return {"root": root, "csv": csv, "cfg": cfg, "files": files, "url": f"sqlite:///{data}/ctqa.sqlite"}


def _rows(url):
    from sqlalchemy import inspect, select

    from storage.db import Database
    from storage.models import Calibration

    db = Database(url)
    try:
        if not inspect(db.engine).has_table("calibrations"):
            return None
        with db.session() as s:
            return s.scalars(select(Calibration).order_by(Calibration.id)).all()
    finally:
        db.dispose()


def _walk(items):
    for it in items:
        yield it
        yield from _walk(getattr(it, "ContentSequence", []))


@pytest.fixture(scope="module")
def calibrated(synthetic):
    r = qa_node("--config", str(synthetic["cfg"]), "calibrate", "--ratings", str(synthetic["csv"]),
                "--metrics", "global_noise_hu,ldctiqa_score", "--bootstrap", "200", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_calibration_stored_and_recovers_the_synthetic_levels(synthetic, calibrated) -> None:
    from analysis.calibration import LikertMap

    doc = calibrated
    assert doc["n_ratings"] == 25 and doc["n_images"] == 25 and doc["stored"] is True
    by_metric = {c["metric"]: c for c in doc["calibrations"]}
    lq = by_metric["ldctiqa_score"]  # no weights configured: reported, not a crash, not stored
    assert lq["available"] is False and "LDCTIQA weights not installed" in lq["reason"]
    gn = by_metric["global_noise_hu"]
    assert gn["available"] is True and gn["n_images"] == 25 and gn["n_series"] == 4
    st = gn["statistics"]
    assert st["folds"] == 4  # 4 series: one per fold, never split
    assert st["raw"]["srocc"]["value"] < -0.8  # more noise, lower (synthetic) rating
    cv = st["cross_validated"]
    assert cv["srocc"]["value"] > 0.8
    lo, hi = cv["aggregate"]["ci95"]
    assert lo <= cv["aggregate"]["value"] <= hi
    rows = _rows(synthetic["url"])  # the old database got the table
    assert [(r.metric, r.id) for r in rows] == [("global_noise_hu", gn["id"])]
    row = rows[0]
    assert (row.n_ratings, row.n_images, row.n_series, row.method) == (25, 25, 4, gn["method"])
    assert row.ratings_sha256 == hashlib.sha256(synthetic["csv"].read_bytes()).hexdigest()
    assert row.ratings_file == str(synthetic["csv"].resolve())
    assert json.loads(row.statistics) == st
    assert row.model_version == "CTQA classical patient-based metrics (global noise, WED, SSDE, NPS) 1.0"
    assert row.weights_sha256 is None  # no learned weights behind global noise
    m = LikertMap.from_dict(json.loads(row.parameters))
    assert m.direction == -1
    # the map recovers the known monotone truth on the rated images: mean |Likert - level score| < 0.6
    # (0.25 measured; cross-validated SROCC 0.86: the 4 series start from different noise, so the
    # lower levels of a noisy series overlap the upper levels of a quiet one)
    from analysis.pipeline import run_model
    from analysis.results import RunContext
    from analysis.volume import load_series

    err = []
    for (i, level), f in synthetic["files"].items():
        noise = float(run_model("classical", load_series([f]), RunContext()).slice_metrics["global_noise_hu"][0])
        err.append(abs(m.apply_one(noise) - (4 - level)))
    assert float(np.mean(err)) < 0.6, err


def test_analyze_and_sr_carry_the_likert_value(synthetic, calibrated, capsys) -> None:
    from analysis.calibration import LikertMap
    from analysis.pipeline import analyse_series
    from analysis.results import RunContext
    from node.calibrate import apply_calibrations, current_calibrations
    from node.outputs import build_outputs
    from storage.db import Database

    row = _rows(synthetic["url"])[0]
    m = LikertMap.from_dict(json.loads(row.parameters))
    f = synthetic["files"][(2, 2)]
    from node.cli import main

    capsys.readouterr()
    assert main(["--config", str(synthetic["cfg"]), "analyze", "--json", str(f)]) == 0
    item = json.loads(capsys.readouterr().out)[0]
    noise = item["metrics"]["global_noise_hu"]
    likert = item["metrics"]["global_noise_hu_likert"]
    assert likert == pytest.approx(m.apply_one(noise), abs=1e-12) and 0.0 <= likert <= 4.0
    note = item["info"]["global_noise_hu_likert_calibration"]
    assert note.startswith(f"calibration {row.id} of {row.created_at:%Y-%m-%d %H:%M} UTC, {row.method}, fitted on "
                           "25 rated images of 4 series")
    # the SR of the same analysis (the worker's path: analyse, apply the calibrations, build the outputs)
    db = Database(synthetic["url"])
    try:
        result = analyse_series([f], ["classical"], RunContext())
        apply_calibrations(result, current_calibrations(db))
    finally:
        db.dispose()
    built = build_outputs(result, "CT1", uid_seed="test-calibrate:1")
    sr = dict(built.objects)["sr"]
    out = synthetic["root"] / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    ds = pydicom.dcmread(out)
    groups = [it for it in _walk(ds.ContentSequence)
              if it.ValueType == "CONTAINER" and any(
                  getattr(c, "TextValue", "") == "Series QA: CTQA site Likert calibration"
                  for c in getattr(it, "ContentSequence", []))]
    assert len(groups) == 1
    nums = [it for it in _walk(groups[0].ContentSequence) if it.ValueType == "NUM"]
    assert len(nums) == 1
    num = nums[0]
    assert num.ConceptNameCodeSequence[0].CodeValue == "GLOBAL_NOISE_LK"
    assert num.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99CTQA"
    assert num.ConceptNameCodeSequence[0].CodeMeaning == "Global noise, site Likert calibration"
    mv = num.MeasuredValueSequence[0]
    assert mv.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert float(getattr(mv, "FloatingPointValue", mv.NumericValue)) == pytest.approx(likert, abs=1e-9)
    texts = [getattr(it, "TextValue", "") for it in _walk(num.ContentSequence)]
    assert "CTQA site Likert calibration" in texts
    assert any(t.startswith(f"global_noise_hu_likert=calibration {row.id} of ") for t in texts), texts
    # the raw global noise is still there, in the classical group
    raw = [it for it in _walk(ds.ContentSequence) if it.ValueType == "NUM"
           and it.ConceptNameCodeSequence[0].CodeValue == "GLOBAL_NOISE"]
    assert raw and float(raw[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(noise, rel=1e-6)


def test_bad_ratings_file_and_unknown_metric_store_nothing(synthetic, calibrated, capsys) -> None:
    from node.cli import main

    before = len(_rows(synthetic["url"]))
    bad = synthetic["root"] / "rated" / "bad.csv"
    bad.write_text("path,score\nsrc0_L0.dcm,7\nno_such.dcm,2\nsrc0_L1.dcm,3\n")
    rc = main(["--config", str(synthetic["cfg"]), "calibrate", "--ratings", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "2 problem(s); nothing calibrated" in err
    assert "line 2: score '7' is outside [0, 4]" in err and "line 3: no such file 'no_such.dcm'" in err
    assert "Traceback" not in err
    rc = main(["--config", str(synthetic["cfg"]), "calibrate", "--ratings", str(synthetic["csv"]),
               "--metrics", "wed_cm"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot calibrate 'wed_cm': calibratable metrics are global_noise_hu" in err
    assert "Traceback" not in err
    assert len(_rows(synthetic["url"])) == before


def test_the_worker_stores_and_sends_the_likert_value(tmp_path) -> None:
    """A received series analysed by the node's worker (in process): the newest calibration's map of
    its global noise is stored beside the raw value and written into the SR it queues."""
    from sqlalchemy import select

    from reports.sr import read_measurement_report
    from storage.models import AnalysisRun, Calibration, OutputObject, SeriesMetric
    from tests.integration.test_node_pipeline import make_node, push_and_analyse

    files = [require(SHARED_DATA / SOURCES[0]), require(SHARED_DATA / SOURCES[1])]  # 2 slices of one series
    n = make_node(tmp_path, analysis={"device": "cpu", "models": ["classical"]})
    try:
        common = dict(metric="global_noise_hu", method="isotonic", n_ratings=10, n_images=10, n_series=2,
                      ratings_file="/r.csv", ratings_sha256="0" * 64, statistics="{}")
        with n.db.session() as s:  # a superseded one, then the one in use: Likert = 4 - noise / 25 on 0-100 HU
            s.add(Calibration(**common, parameters=json.dumps(
                {"method": "isotonic", "direction": -1, "params": {"x": [0.0, 10.0], "y": [4.0, 0.0]}})))
            s.add(Calibration(**common, parameters=json.dumps(
                {"method": "isotonic", "direction": -1, "params": {"x": [0.0, 100.0], "y": [4.0, 0.0]}})))
            s.commit()
        push_and_analyse(n, files)
        with n.db.session() as s:
            got = {(r.model, m.name): m.value for r, m in s.execute(
                select(AnalysisRun, SeriesMetric).join(SeriesMetric).where(AnalysisRun.current.is_(True)))}
            sr_rel = s.scalars(select(OutputObject.rel_path).where(OutputObject.kind == "sr")).one()
        noise = got[("classical", "global_noise_hu")]
        assert 10.0 < noise < 100.0
        assert got[("calibration", "global_noise_hu_likert")] == pytest.approx(4.0 - noise / 25.0, abs=1e-12)
        content = read_measurement_report(pydicom.dcmread(n.store.abs(sr_rel)))
        in_sr = {m.key: m for m in content.series_metrics}
        assert in_sr["global_noise_hu_likert"].value == pytest.approx(4.0 - noise / 25.0, abs=1e-9)
        assert in_sr["global_noise_hu"].value == pytest.approx(noise, rel=1e-9)
        alg = in_sr["global_noise_hu_likert"].algorithm
        assert alg.name == "CTQA site Likert calibration"
        assert any(p.startswith("global_noise_hu_likert=calibration 2 of ") for p in alg.notes), alg.notes
        # a calibration fitted on other weights does not apply: null with the reason, no made-up value
        from analysis.pipeline import analyse_series
        from analysis.results import RunContext
        from node.calibrate import apply_calibrations, current_calibrations

        with n.db.session() as s:
            s.add(Calibration(**common, parameters=json.dumps(
                {"method": "isotonic", "direction": -1, "params": {"x": [0.0, 100.0], "y": [4.0, 0.0]}}),
                weights_sha256="ab" * 32))
            s.commit()
        result = analyse_series(files, ["classical"], RunContext())
        apply_calibrations(result, current_calibrations(n.db))
        assert result.metrics["global_noise_hu_likert"] is None
        assert result.reasons["global_noise_hu_likert"] == (
            "calibration 3 was fitted with weights abababababab, this analysis used none: run qa-node calibrate again")
    finally:
        n.db.dispose()
