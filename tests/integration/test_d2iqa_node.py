"""D2IQA in the node (issue 7, item 7), without the network: a completed series analysed with models
[basic, d2iqa] gets the series score ``d2iqa_score`` and one per-slice score for every scored slice in
the database and in the SR, equal to what the model's ``run()`` gives in process with the configured
trials and slice subset; `qa-node analyze --json` (the same [analysis.d2iqa] table in its config) reports
``d2iqa_score`` with the in-process value."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import select

from analysis import d2iqa
from analysis.models import d2iqa as d2iqa_model
from analysis.results import RunContext
from analysis.volume import load_series
from node.service import Node
from reports.sr import read_measurement_report
from storage.models import AnalysisRun, OutputObject, SeriesMetric, SliceMetric
from tests.helpers import PHANTOM_5MM, WG04, analyze_json, require
from tests.integration.test_node_pipeline import make_node, push_and_analyse

needs_weights = pytest.mark.skipif(not d2iqa.WEIGHTS_PATH.is_file(), reason=f"shipped weights {d2iqa.WEIGHTS_PATH} are absent")
TRIALS, MAX_SLICES = 6, 6  # small, so the test is quick; the node must pass them to the model


def _node(tmp_path) -> Node:
    return make_node(tmp_path, analysis={"device": "cpu", "models": ["basic", "d2iqa"],
                     "d2iqa": {"trials": TRIALS, "max_slices": MAX_SLICES}})


@needs_weights
def test_series_d2iqa_score_and_slice_scores_in_database_and_sr(tmp_path):
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))
    torch.set_num_threads(1)
    node = _node(tmp_path)
    push_and_analyse(node, files)
    with node.db.session() as s:
        run = s.scalars(select(AnalysisRun).where(AnalysisRun.current.is_(True), AnalysisRun.model == "d2iqa")).one()
        db_series = {m.name: m.value for m in s.scalars(select(SeriesMetric).where(SeriesMetric.run_id == run.id))}
        db_slices = {m.sop_instance_uid: m.value for m in s.scalars(
            select(SliceMetric).where(SliceMetric.run_id == run.id, SliceMetric.name == "d2iqa_score"))}
        sr_path = s.scalars(select(OutputObject).where(OutputObject.kind == "sr")).one().rel_path

    vol = load_series(files)
    ref = d2iqa_model.run(vol, RunContext(device="cpu"), d2iqa_model.Options(trials=TRIALS, max_slices=MAX_SLICES))
    ref_slices = ref.slice_metrics["d2iqa_score"]
    scored = {vol.sop_instance_uids[i]: float(v) for i, v in enumerate(ref_slices) if np.isfinite(v)}
    assert 1 <= len(scored) <= MAX_SLICES  # only the evenly spaced subset, and only slices with room
    assert ref.series_metrics["d2iqa_score"] == pytest.approx(float(np.nanmean(ref_slices)))

    # database: the series score and exactly the scored slices, with the in-process values
    assert db_series["d2iqa_score"] == pytest.approx(ref.series_metrics["d2iqa_score"], rel=1e-6)
    finite_db = {k: v for k, v in db_slices.items() if v is not None and np.isfinite(v)}
    assert finite_db.keys() == scored.keys()
    for uid, v in scored.items():
        assert finite_db[uid] == pytest.approx(v, rel=1e-6, abs=1e-9)

    # SR: the same series value and one per-slice value per scored slice, referencing that image
    content = read_measurement_report(pydicom.dcmread(node.store.abs(sr_path)))
    sr_series = {m.key: m.value for m in content.series_metrics}
    assert sr_series["d2iqa_score"] == pytest.approx(db_series["d2iqa_score"], rel=1e-6)
    sr_slices = {m.sop_instance_uid: m.value for m in content.slice_metrics if m.key == "d2iqa_score"}
    assert sr_slices.keys() == scored.keys()
    for uid, v in scored.items():
        assert sr_slices[uid] == pytest.approx(v, rel=1e-5, abs=1e-7)
    assert all(m.algorithm.name == d2iqa_model.ALGORITHM for m in content.slice_metrics if m.key == "d2iqa_score")


@needs_weights
def test_analyze_json_reports_d2iqa_score(tmp_path):
    ct2 = require(WG04) / "CT2_UNC"
    cfg = tmp_path / "c.toml"  # the [analysis.d2iqa] table reaches analyze too (its 50 default trials: 20 s a run)
    cfg.write_text(f'[node]\n[analysis]\ndevice = "cpu"\ntorch_threads = 1\n'
                   f'[analysis.d2iqa]\ntrials = {TRIALS}\nmax_slices = {MAX_SLICES}\n')
    item = analyze_json(ct2, "basic", "d2iqa", cwd=tmp_path, config=cfg)
    torch.set_num_threads(1)
    ref = d2iqa_model.run(load_series([ct2]), RunContext(device="cpu"),
                          d2iqa_model.Options(trials=TRIALS, max_slices=MAX_SLICES))
    assert ref.series_metrics["d2iqa_score"] is not None
    assert item["metrics"]["d2iqa_score"] == pytest.approx(ref.series_metrics["d2iqa_score"], rel=1e-5, abs=1e-7)
    assert 0.0 < item["metrics"]["d2iqa_score"] <= 1.0
