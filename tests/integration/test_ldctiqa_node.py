"""LDCTIQA as a model of the platform (issue 13, items 3, 5 and 7), with a random-weight checkpoint
saved in the published format (``{"model_state_dict": ...}``): its checksum is not the published
one, so the one-warning path is exercised. The node writes both scores and the checksum into the
SR (TID 4019), says when slices were resampled to 512 x 512, reports null metrics with the reason
when the weights are not installed (one start-up warning), and `analyze --json --per-slice`
gives every slice's metrics of every model, with the out-of-distribution flag beside the scores."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import select

from analysis.models import ldctiqa as ldctiqa_model
from analysis.pipeline import run_model
from analysis.results import RunContext
from analysis.volume import load_series
from analysis.weights import file_sha256
from reports.sr import read_measurement_report, read_notes
from storage.models import AnalysisRun, OutputObject, SeriesMetric
from tests.helpers import PHANTOM_5MM, SHARED_DATA, qa_node, require
from tests.integration.test_node_pipeline import make_node, push_and_analyse

CT_SMALL = SHARED_DATA / "corpus" / "pydicom" / "GE_RHAPSODE_CT_small_128" / "CT_small.dcm"  # 128 x 128
KEYS = ("ldctiqa_score", "ldctiqa_expected_score")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from analysis.ldctiqa import MultiHeadSwin

    torch.manual_seed(13)
    net = MultiHeadSwin()
    path = tmp_path_factory.mktemp("w") / "site-ldct-iqa.pt"
    torch.save({"model_state_dict": net.state_dict()}, path)  # the published file's layout
    return path


def _sr(node):
    with node.db.session() as s:
        rel = s.scalars(select(OutputObject).where(OutputObject.kind == "sr")).one().rel_path
    return pydicom.dcmread(node.store.abs(rel))


def test_node_scores_ldctiqa_with_a_site_checkpoint_and_says_so_in_the_sr(tmp_path, checkpoint, caplog):
    torch.set_num_threads(1)
    src = require(CT_SMALL)
    node = make_node(tmp_path, analysis={"device": "cpu", "models": ["basic", "ldctiqa"],
                                         "ldctiqa": {"weights": str(checkpoint)}})
    with caplog.at_level(logging.WARNING):
        job_id = push_and_analyse(node, [src])
    sha = file_sha256(checkpoint)
    warned = [r for r in caplog.records if "not the published" in r.getMessage()]
    assert len(warned) == 1 and sha in warned[0].getMessage()  # one warning: the file is loaded once (cached)

    ref = ldctiqa_model.run(load_series([src]), RunContext(device="cpu"), ldctiqa_model.Options(weights=str(checkpoint)))
    assert 0.0 <= ref.series_metrics["ldctiqa_score"] <= 4.0 and 0.0 <= ref.series_metrics["ldctiqa_expected_score"] <= 4.0
    with node.db.session() as s:
        db = {m.name: m.value for m in s.scalars(
            select(SeriesMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True)))}
    content = read_measurement_report(_sr(node))
    got = {m.key: m for m in content.series_metrics if m.key in KEYS}
    assert set(got) == set(KEYS)
    for key in KEYS:
        assert db[key] == pytest.approx(ref.series_metrics[key], abs=1e-6)
        assert got[key].value == pytest.approx(ref.series_metrics[key], abs=1e-4)
        alg = got[key].algorithm
        assert alg.name == ldctiqa_model.ALGORITHM and alg.weights_sha256 == sha
        assert "resampled=128x128 to 512x512" in alg.notes and "scored_slices=1 of 1" in alg.notes
    # rebuild-outputs (from the stored results, no model run) restores the same TID 4019 parameters
    from node.rebuild import result_from_storage

    (stored,) = [o for o in result_from_storage(node.db, node.store, job_id).outputs if o.name == "ldctiqa"]
    assert stored.parameters == ref.parameters == ["scored_slices=1 of 1", "resampled=128x128 to 512x512"]
    assert stored.out_of_distribution == ref.out_of_distribution == [] and "algorithm_parameters" not in stored.info
    per_slice = [m for m in content.slice_metrics if m.key == "ldctiqa_expected_score"]
    assert len(per_slice) == 1 and per_slice[0].value == pytest.approx(ref.slice_metrics["ldctiqa_expected_score"][0], abs=1e-4)


def test_without_weights_the_scores_are_null_with_the_reason_and_one_startup_warning(tmp_path, caplog):
    missing = tmp_path / "ldct-iqa.pt"
    node = make_node(tmp_path, analysis={"device": "cpu", "models": ["basic", "ldctiqa"],
                                         "ldctiqa": {"weights": str(missing)}})
    with caplog.at_level(logging.WARNING):
        node.worker.start()
        node.worker.stop(timeout=10)
        push_and_analyse(node, [require(CT_SMALL)])  # the job is done: the node keeps working
    lines = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert lines == [f"model ldctiqa: LDCTIQA weights not installed: see analysis/weights/LDCTIQA_MODEL_CARD.md "
                     f"(looked for {missing})"]
    with node.db.session() as s:
        db = {m.name: m.value for m in s.scalars(
            select(SeriesMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True)))}
    assert db["n_slices"] == 1.0 and all(db.get(k) is None for k in KEYS)
    notes = read_notes(_sr(node))
    for key in KEYS:
        assert "LDCTIQA weights not installed" in notes[key]


def test_analyze_per_slice_matches_each_models_own_run_and_flags_out_of_distribution(tmp_path, checkpoint):
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:2]
    folder = tmp_path / "series"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\n[analysis]\ndevice = "cpu"\ntorch_threads = 1\n'
                   f'[analysis.ldctiqa]\nweights = "{checkpoint}"\n')
    r = qa_node("--config", str(cfg), "analyze", "--json", "--per-slice", "--models", "basic,classical,ldctiqa",
                str(folder), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (item,) = json.loads(r.stdout)
    vol = load_series(sorted(folder.iterdir()))
    ctx = RunContext(device="cpu", torch_threads=1,
                     options={"ldctiqa": ldctiqa_model.Options(weights=str(checkpoint))})
    refs = {name: run_model(name, vol, ctx) for name in ("basic", "classical", "ldctiqa")}
    slices = item["slices"]
    assert [s["sop_instance_uid"] for s in slices] == vol.sop_instance_uids
    assert [s["instance_number"] for s in slices] == [int(h.InstanceNumber) for h in vol.headers]
    for name, out in refs.items():
        assert out.slice_metrics, name
        for key, values in out.slice_metrics.items():
            for i, s in enumerate(slices):
                v = values[i]
                assert (s["metrics"][key] is None) if not np.isfinite(v) else s["metrics"][key] == pytest.approx(v, abs=1e-6)
    # the phantom is a head (BodyPartExamined BRAIN): outside LDCTIQA's abdominal training data
    (lm,) = [m for m in item["models"] if m["name"] == "ldctiqa"]
    assert lm["out_of_distribution"] is True
    assert lm["out_of_distribution_reasons"] == ["body part BRAIN is not among the training regions "
                                                 "(ABDOMEN, ABDOMENPELVIS, PANCREAS, LIVER)"]
    for key in KEYS:
        assert item["metric_flags"][key].startswith("outside the model's training distribution: body part BRAIN")
    assert "global_noise_hu" not in item["metric_flags"]  # classical metrics are not learned: never flagged
