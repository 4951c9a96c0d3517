"""The model platform (issue 13, item 1): every model declares itself once (analysis/models/<name>.py)
and the registry, config tables, code catalogue, trended defaults and report rows follow from the
specs. The four models moved to that shape with unchanged results: tests/data/model_baseline.json
was recorded with the code before the move (commit f28117e, same series, D2IQA with 4 trials on 2
slices) and is reproduced here exactly (floats within 1e-6)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import models as registry
from analysis.models import d2iqa as d2iqa_model
from analysis.models import n2q as n2q_model
from analysis.pipeline import analyse_series
from analysis.results import RunContext
from node.config import ConfigError, settings_from_dict
from node.worker import run_context
from tests.helpers import PHANTOM_5MM, WG04, require

BASELINE = Path(__file__).resolve().parents[1] / "data" / "model_baseline.json"


def _hash(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(values, dtype=np.float64)).tobytes()).hexdigest()


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-6)


@pytest.mark.parametrize("series", ["phantom5mm_6", "wg04_ct1"])
def test_refactored_models_reproduce_the_recorded_outputs(series):
    base = json.loads(BASELINE.read_text())[series]
    files = (sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:6]
             if series == "phantom5mm_6" else [require(WG04) / "CT1_UNC"])
    ctx = RunContext(device="cpu", torch_threads=1,
                     options={"d2iqa": d2iqa_model.Options(trials=4, max_slices=2)})
    torch.set_num_threads(1)
    result = analyse_series(files, ["basic", "classical", "n2q", "d2iqa"], ctx)
    assert result.status == "done", result.reason
    assert [o.name for o in result.outputs] == ["basic", "classical", "n2q", "d2iqa"]  # run order
    assert sorted(base["models"]) == sorted(o.name for o in result.outputs)
    for out in result.outputs:
        want = base["models"][out.name]
        assert (out.algorithm, out.version, out.weights_sha256) == (want["algorithm"], want["version"],
                                                                    want["weights_sha256"])
        assert set(out.series_metrics) == set(want["series_metrics"])
        for k, v in out.series_metrics.items():
            assert _close(v, want["series_metrics"][k]), (out.name, k, v, want["series_metrics"][k])
        assert out.reasons == want["reasons"] and out.info == want["info"]
        assert set(out.slice_metrics) == set(want["slice_metrics"])
        for k, v in out.slice_metrics.items():
            w = want["slice_metrics"][k]
            got = [None if not np.isfinite(x) else float(x) for x in v]
            assert all(_close(a, b) for a, b in zip(got, w["values"], strict=True)), (out.name, k)
        assert {m.name for m in out.maps} == set(want["maps"])
        for m in out.maps:
            w = want["maps"][m.name]
            assert list(m.values.shape) == w["shape"] and (m.label, m.unit_code) == (w["label"], w["unit_code"])
            # a bit-identical map hashes the same; otherwise its mean must agree within 1e-6
            assert _hash(m.values) == w["sha256"] or abs(float(np.mean(m.values)) - w["mean"]) < 1e-6


def test_everything_model_specific_is_derived_from_the_specs():
    import node.catalogue  # noqa: F401
    from node.outputs import REPORT_KEYS
    from reports.codes import CATALOGUE, MAPS
    from reports.trend_settings import TrendSettings

    specs = registry.specs()
    assert list(specs)[:4] == ["basic", "classical", "n2q", "d2iqa"]
    declared = [m.key for s in specs.values() for m in s.metrics]
    # then the calibrated scores (qa-node calibrate), one <metric>_likert per calibratable metric
    likert = [k + "_likert" for k in ("global_noise_hu", "n2q_mean_quality", "d2iqa_score", "ldctiqa_score",
                                      "ldctiqa_expected_score", "delta_iqa_score")]
    assert list(CATALOGUE) == declared + likert
    assert set(MAPS) == {m.name for s in specs.values() for m in s.maps} >= {"local_noise_sd", "n2q_quality"}
    assert CATALOGUE["ssde_mgy"].concept.value == "113930" and CATALOGUE["ssde_mgy"].unit.value == "mGy"
    assert TrendSettings().metrics == tuple(m.key for s in specs.values() for m in s.metrics if m.trended)
    assert "global_noise_hu" in TrendSettings().metrics and "wed_cm" not in TrendSettings().metrics
    assert REPORT_KEYS[:2] == ("global_noise_hu", "wed_cm") and REPORT_KEYS[-3:] == ("n_slices", "kvp",
                                                                                      "slice_thickness_mm")
    s = settings_from_dict({"node": {}})
    assert s.analysis.models == ["basic", "classical"]
    assert set(s.analysis.model_options) == set(specs)


def test_model_tables_are_validated_and_old_keys_get_a_migration_line():
    s = settings_from_dict({"node": {}, "analysis": {"torch_threads": 1, "n2q": {"low_threshold": 0.7, "batch": 2},
                                                     "d2iqa": {"trials": 9}}})
    ctx = run_context(s, "cpu")
    assert ctx.torch_threads == 1
    assert ctx.options_for("n2q") == n2q_model.Options(low_threshold=0.7, batch=2)
    assert ctx.options_for("d2iqa").trials == 9 and ctx.options_for("d2iqa").max_slices == 16
    cases = {
        "n2q_low_threshold": ({"n2q_low_threshold": 0.7},
                              "key 'analysis.n2q_low_threshold' has moved: write it as [analysis.n2q] low_threshold = 0.7"),
        "unknown": ({"n2q": {"thresh": 1}}, "unknown key 'analysis.n2q.thresh'; expected one of: amp, batch, channels_last, low_threshold, weights"),
        "type": ({"d2iqa": {"trials": "many"}}, "key 'analysis.d2iqa.trials' must be an integer, got 'many'"),
        "range": ({"n2q": {"low_threshold": 1.5}}, "key 'analysis.n2q.low_threshold' must be in (0, 1], got 1.5"),
        "no options": ({"basic": {"x": 1}}, "unknown key 'analysis.basic.x'; the model basic has no options"),
    }
    for name, (table, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            settings_from_dict({"node": {}, "analysis": table}, "c.toml")
        assert str(err.value) == f"c.toml: {message}", name


def test_series_noisier_than_the_training_data_is_flagged_in_the_result_and_the_sr():
    """WG-04 CT1 (a 5 mm chest slice, global noise 25 HU) with 70 HU of added noise: beyond N2Q's
    training range (1-60 HU). The flag and its reason stand beside N2Q's scores (ModelOutput, and
    the SR's TID 4019 parameters); the classical metrics are never flagged."""
    from analysis.pipeline import SeriesResult, flag_out_of_distribution, run_model
    from analysis.volume import load_series
    from node.outputs import build_outputs
    from reports.sr import read_measurement_report

    torch.set_num_threads(1)
    vol = load_series([require(WG04) / "CT1_UNC"])
    rng = np.random.default_rng(0)
    vol.hu[:] = vol.hu + rng.normal(0.0, 70.0, vol.hu.shape).astype(np.float32)
    ctx = RunContext(device="cpu")
    result = SeriesResult("1.2.3", "1.2", 1, "done", None, [run_model(m, vol, ctx) for m in ("classical", "n2q")], vol)
    flag_out_of_distribution(result)
    classical, n2q = result.outputs
    noise = classical.series_metrics["global_noise_hu"]
    assert noise > 65
    assert classical.out_of_distribution == []
    assert n2q.out_of_distribution == [f"global noise {noise:.3g} HU is above the training range 1-60 HU"]

    built = build_outputs(result, "CT1", uid_seed="test-ood")
    sr = dict(built.objects)["sr"]
    content = read_measurement_report(sr)
    by_key = {m.key: m.algorithm for m in content.series_metrics}
    assert by_key["n2q_mean_quality"].notes == (f"out_of_distribution=yes: {n2q.out_of_distribution[0]}",)
    assert by_key["global_noise_hu"].notes == ()

    # inside the range (the unmodified slice, 25 HU, 5 mm): no flag
    clean = load_series([require(WG04) / "CT1_UNC"])
    ok = SeriesResult("1.2.3", "1.2", 1, "done", None, [run_model(m, clean, ctx) for m in ("classical", "n2q")], clean)
    flag_out_of_distribution(ok)
    assert ok.outputs[1].out_of_distribution == []


def test_training_distribution_reasons():
    spec = registry.get("d2iqa").training
    assert spec.outside(body_part="HEAD", global_noise_hu=10.0, slice_thickness_mm=1.0) == []
    assert spec.outside(body_part=None, global_noise_hu=None, slice_thickness_mm=None) == []  # unknown: not judged
    assert spec.outside(body_part="knee", global_noise_hu=1.0, slice_thickness_mm=5.0) == [
        "body part KNEE is not among the training regions (HEAD, BRAIN, SKULL, NECK, HEADNECK, CHEST, THORAX, ABDOMEN)",
        "global noise 1 HU is below the training range 2.5-125 HU",
        "slice thickness 5 mm is above the training range 1-1 mm",
    ]
    assert registry.get("ldctiqa").training.outside(body_part="ABDOMEN", global_noise_hu=500.0,
                                                    slice_thickness_mm=10.0) == []  # only the region is stated


def test_spec_defaults_equal_the_implementations_defaults():
    """The spec modules import no torch, so the implementation keeps its own defaults: they must agree."""
    from analysis import d2iqa, ldctiqa
    from analysis.models import ldctiqa as ldctiqa_model

    assert (d2iqa_model.Options().trials, d2iqa_model.Options().max_slices) == (d2iqa.DEFAULT_TRIALS,
                                                                                 d2iqa.DEFAULT_MAX_SLICES)
    assert ldctiqa_model.Options().max_slices == ldctiqa.DEFAULT_MAX_SLICES
    assert registry.get("n2q").maps[0].model_matrix == __import__("analysis.n2q").n2q.MODEL_SIZE
