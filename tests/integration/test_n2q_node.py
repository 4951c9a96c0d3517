"""N2Q in the node (issue 6, item 7), without the network: a completed series analysed with models
[basic, classical, n2q] gets the N2Q quality map as a Parametric Map (one frame per slice, values
read back equal to the model's own map of each source slice) and the N2Q series metrics in the
database and the SR; `qa-node analyze --json` reports n2q_mean_quality / p05 / low_fraction with
the values the model gives in process."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from sqlalchemy import select

from analysis.models import n2q as n2q_model
from analysis.results import RunContext
from analysis.volume import load_series
from node.service import Node
from reports.sr import read_measurement_report
from storage.models import AnalysisRun, OutputObject, SeriesMetric
from tests.helpers import WG04, analyze_json, require
from tests.integration.test_node_pipeline import make_node, phantom_slices, push_and_analyse

N2Q_KEYS = ("n2q_mean_quality", "n2q_p05_quality", "n2q_low_fraction")


def _node(tmp_path) -> Node:
    return make_node(tmp_path, analysis={"device": "cpu", "models": ["basic", "classical", "n2q"]})


def _n2q_maps(node: Node) -> list[pydicom.Dataset]:
    with node.db.session() as s:
        paths = [o.rel_path for o in s.scalars(select(OutputObject).where(OutputObject.kind == "pmap"))]
    maps = [pydicom.dcmread(node.store.abs(p)) for p in paths]
    return [pm for pm in maps if any(e.get("ManufacturerModelName") == n2q_model.ALGORITHM
                                     for e in pm.get("ContributingEquipmentSequence", []))]


def test_series_with_n2q_gets_its_quality_map_in_a_parametric_map(tmp_path):
    files = phantom_slices(8)
    torch.set_num_threads(1)
    node = _node(tmp_path)
    push_and_analyse(node, files)
    with node.db.session() as s:
        db_metrics = {m.name: m.value for m in s.scalars(
            select(SeriesMetric).join(AnalysisRun).where(AnalysisRun.current.is_(True)))}
        sr_path = s.scalars(select(OutputObject).where(OutputObject.kind == "sr")).one().rel_path

    # what the model itself says about these slices (same loader, same weights): its map and summary
    vol = load_series(files)
    ref = n2q_model.run(vol, RunContext(device="cpu"))
    (ref_map,) = ref.maps
    expected, sha = ref_map.values, ref.weights_sha256
    assert ref_map.name == n2q_model.MAP_NAME and sha
    (pm,) = _n2q_maps(node)
    assert pm.NumberOfFrames == len(files) == vol.n_slices
    assert any(sha in str(e.get("ContributionDescription", "")) for e in pm.ContributingEquipmentSequence)
    # stored at the model's 256 x 256 (2 x 2 blocks of the 512 x 512 map), values through the RWVM
    from reports.pmap import block_mean, map_values

    pixels = map_values(pm)
    assert pixels.shape == (len(files), 256, 256) and pm.BitsAllocated == 16
    expected = block_mean(expected.astype(np.float32), 2)
    step = float(pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueSlope)
    index = {uid: i for i, uid in enumerate(vol.sop_instance_uids)}
    seen = set()
    for k, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        seen.add(uid)
        np.testing.assert_allclose(pixels[k], expected[index[uid]], rtol=0, atol=0.5 * step + 1e-6)
    assert seen == set(vol.sop_instance_uids)  # every slice has its frame
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0  # SSIM units

    # the series summary: database and SR equal the model's run() on the same volume
    sr_items = {m.key: m.value for m in read_measurement_report(pydicom.dcmread(node.store.abs(sr_path))).series_metrics}
    for key in N2Q_KEYS:
        assert ref.series_metrics[key] is not None, key
        assert db_metrics[key] == pytest.approx(ref.series_metrics[key], rel=1e-5, abs=1e-7), key
        assert sr_items[key] == pytest.approx(db_metrics[key], rel=1e-6, abs=1e-7), key
    assert 0.0 < db_metrics["n2q_p05_quality"] <= db_metrics["n2q_mean_quality"] <= 1.0


def test_analyze_json_reports_the_n2q_summary(tmp_path):
    ct1 = require(WG04) / "CT1_UNC"
    item = analyze_json(ct1, "basic", "n2q", cwd=tmp_path)
    torch.set_num_threads(1)
    ref = n2q_model.run(load_series([ct1]), RunContext(device="cpu"))
    for key in N2Q_KEYS:
        assert item["metrics"][key] == pytest.approx(ref.series_metrics[key], rel=1e-4, abs=1e-6), key
    assert 0.0 < item["metrics"]["n2q_p05_quality"] <= item["metrics"]["n2q_mean_quality"] <= 1.0
    assert 0.0 <= item["metrics"]["n2q_low_fraction"] <= 1.0
