"""`qa-node analyze`: the offline pipeline and its JSON contract."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import PHANTOM_5MM, WG04, pydicom_file, qa_node, require


def test_analyze_json_contract_on_real_series(tmp_path):
    wg04 = require(WG04)
    phantom = require(PHANTOM_5MM)
    # two series in one folder, plus a file that is not DICOM
    work = tmp_path / "in"
    shutil.copytree(phantom, work / "phantom")
    shutil.copy(wg04 / "CT2_UNC", work / "ct2.dcm")
    (work / "notes.txt").write_text("not a DICOM file")
    r = qa_node("analyze", "--json", str(work), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert isinstance(items, list) and len(items) == 2
    by_n = {it["n_instances"]: it for it in items}
    ph = by_n[len([p for p in phantom.iterdir() if p.name.startswith("I")])]
    ct2 = by_n[1]
    for it in items:
        assert set(it) >= {"series_instance_uid", "study_instance_uid", "scanner", "scanner_identity", "n_instances",
                           "status", "reason", "metrics", "metric_reasons", "models"}
        assert it["status"] == "done" and it["reason"] is None and it["scanner"] is None
        for key in ("global_noise_hu", "wed_cm", "ssde_mgy", "ctdivol_mgy", "nps_f_peak_per_mm",
                    "nps_f_avg_per_mm", "mean_hu_tissue"):
            assert key in it["metrics"]
            if it["metrics"][key] is None:
                assert it["metric_reasons"][key], f"{key} is null without a reason"
    assert ph["scanner_identity"] == {"manufacturer": "Philips", "model": "Ingenuity CT", "device_serial": "336067",
                                      "station_name": "CT4"}
    assert ph["metrics"]["n_slices"] == ph["n_instances"]
    assert 9.0 < ph["metrics"]["ctdivol_mgy"] < 20.0  # the shared data README: about 9 to 20 mGy
    assert ct2["metrics"]["ssde_mgy"] is None and "CTDIvol" in ct2["metric_reasons"]["ssde_mgy"]
    assert "notes.txt" in r.stderr  # the unreadable file is named, not silently dropped
    # --models restricts what runs
    r = qa_node("analyze", "--json", "--models", "basic", str(wg04 / "CT1_UNC"), cwd=tmp_path)
    (one,) = json.loads(r.stdout)
    assert [m["name"] for m in one["models"]] == ["basic"] and "global_noise_hu" not in one["metrics"]
    # text output carries the same numbers
    r = qa_node("analyze", str(wg04 / "CT1_UNC"), cwd=tmp_path)
    assert r.returncode == 0 and "global_noise_hu" in r.stdout and "status    done" in r.stdout


def test_analyze_skips_non_ct_and_rejects_bad_requests(tmp_path):
    mr = pydicom_file("MR_small.dcm")
    r = qa_node("analyze", "--json", str(mr), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (it,) = json.loads(r.stdout)
    assert it["status"] == "skipped" and "CT" in it["reason"]
    r = qa_node("analyze", "--models", "basic,nonsense", str(mr), cwd=tmp_path)
    assert r.returncode == 2 and "Unknown model 'nonsense'" in r.stderr and "Traceback" not in r.stderr
    r = qa_node("analyze", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_analyze_json_says_which_rule_selected_or_skipped_each_model(tmp_path):
    from tests.integration.test_selection_node import copy_series

    phantom = require(PHANTOM_5MM)
    files = sorted(p for p in phantom.iterdir() if p.name.startswith("I"))[:4]
    work = tmp_path / "in"
    (work / "orig").mkdir(parents=True)
    for f in files:
        shutil.copy(f, work / "orig" / f.name)
    mip_uid, _ = copy_series(files, work / "mip", ImageType=["DERIVED", "SECONDARY", "AXIAL", "MIP"])
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n\n[analysis]\ndevice = "cpu"\nmodels = ["basic", "classical"]\n\n'
                   '[[scanners]]\nname = "CT1"\nae_title = "CT1"\n\n'
                   '[[selection]]\nname = "ct1 classical"\nmodels = ["classical"]\nscanner = "CT1"\n')

    def run(*extra):
        r = qa_node("--config", str(cfg), "analyze", "--json", *extra, str(work), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return {("mip" if it["series_instance_uid"] == mip_uid else "orig"): it for it in json.loads(r.stdout)}

    def decisions(item):
        return {d["model"]: (d["selected"], d["rule"]) for d in item["selection"]}

    with_scanner = run("--scanner", "CT1")
    assert decisions(with_scanner["orig"]) == {"basic": (True, "default"), "classical": (True, "ct1 classical")}
    assert with_scanner["orig"]["status"] == "done" and "global_noise_hu" in with_scanner["orig"]["metrics"]
    mip = with_scanner["mip"]
    assert decisions(mip) == {"basic": (True, "default: derived reformat"),
                              "classical": (False, "default: derived reformat")}
    assert mip["status"] == "skipped" and "global_noise_hu" not in mip["metrics"]
    (why,) = [d["reason"] for d in mip["selection"] if d["model"] == "classical"]
    assert why.endswith("(rule 'ct1 classical' matches; include = [\"reformats\"] would analyse it)")
    # without --scanner the files come from no scanner: the whitelist rule does not match
    no_scanner = run()
    (why,) = [d["reason"] for d in no_scanner["orig"]["selection"] if d["model"] == "classical"]
    assert decisions(no_scanner["orig"])["classical"] == (False, "(no matching rule)")
    assert "scanner absent (rule wants CT1)" in why
    # --all-models: no rules, no defaults; both series run both models
    everything = run("--all-models")
    for item in everything.values():
        assert item["status"] == "done" and "global_noise_hu" in item["metrics"]
        assert all(sel for sel, _ in decisions(item).values()), item["selection"]
