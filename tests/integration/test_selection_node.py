"""Series selection in the node: real series stored, completed and analysed by the node's worker;
`qa-node status --json` says per series which rule (or default) selected or skipped it for which
model. The shared 5 mm phantom series is analysed; the same reconstruction sent again under a new
Series UID is a duplicate; a DERIVED\\SECONDARY MPR copy keeps its basic statistics and trend row but
gets no outputs; a CT-class dose screen gets nothing; a [[selection]] skip rule names itself."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.config import load_settings
from node.service import Node
from node.worker import AnalysisWorker
from storage.models import AnalysisRun, Job, OutputObject, Series
from storage.repo import complete_due_series
from storage.trends import TrendPoint
from tests.helpers import PHANTOM_1MM, PHANTOM_5MM, pacs_destination, qa_node, require
from tests.integration.test_node_pipeline import push_files, run_pending

CONFIG = """
[node]
port = 0
data_dir = "{var}"
database = "sqlite:///{var}/ctqa.sqlite"

[[scanners]]
name = "CT1"
ae_title = "CT1"
""" + pacs_destination(4242, outbox=False) + """
[analysis]
device = "cpu"
models = ["basic", "classical"]

[[selection]]
name = "no classical on thin slices"
models = ["classical"]
action = "skip"
slice_thickness_mm = [0.0, 2.0]
scanner = "CT*"
"""


def copy_series(src_files, folder, **changes):
    """The real files under a new Series UID (and new SOP UIDs), with ``changes`` applied."""
    folder.mkdir()
    series_uid = generate_uid()
    out = []
    for f in src_files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(folder / f.name)
        out.append(folder / f.name)
    return series_uid, out


@pytest.fixture
def node(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(var=tmp_path / "var"))
    settings = load_settings(str(cfg))
    n = Node(settings)
    n.prepare()
    n.worker = AnalysisWorker(settings, n.db, n.store, after_job=n._after_job)
    n.config_file = cfg
    yield n
    n.db.dispose()


def analyse(node, files) -> int:
    push_files(node, files)
    assert len(complete_due_series(node.db, 0.0, node.models)) == 1
    return run_pending(node)


def test_which_rule_selected_or_skipped_each_series_for_each_model(node, tmp_path):
    thick = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:6]
    thin = sorted(p for p in require(PHANTOM_1MM).iterdir() if p.name.startswith("I"))[:4]
    original_uid = str(pydicom.dcmread(thick[0], stop_before_pixels=True).SeriesInstanceUID)
    dup_uid, dup_files = copy_series(thick, tmp_path / "dup")
    mpr_uid, mpr_files = copy_series(thick, tmp_path / "mpr", ImageType=["DERIVED", "SECONDARY", "AXIAL", "MPR"],
                                     SeriesDescription="MPR AX 5MM")
    dose_uid, dose_files = copy_series(thick[:1], tmp_path / "dose", SeriesDescription="Dose Report",
                                       ImageType=["DERIVED", "SECONDARY", "OTHER"])
    thin_uid = str(pydicom.dcmread(thin[0], stop_before_pixels=True).SeriesInstanceUID)
    for files in (thick, dup_files, mpr_files, dose_files, thin):
        analyse(node, files)

    r = qa_node("--config", str(node.config_file), "status", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["series_instance_uid"]: row for row in json.loads(r.stdout)["series"]}

    def decisions(uid):
        return {d["model"]: (d["selected"], d["rule"]) for d in rows[uid]["selection"]}

    # the acquired axial series: both models by default, outputs written
    assert decisions(original_uid) == {"basic": (True, "default"), "classical": (True, "default")}
    assert rows[original_uid]["job"]["outcome"] == "done" and rows[original_uid]["outputs"] == "written"
    # the same images under a new Series UID: a duplicate of the first, nothing run
    assert decisions(dup_uid) == {"basic": (False, "default: duplicate reconstruction"),
                                  "classical": (False, "default: duplicate reconstruction")}
    assert rows[dup_uid]["job"]["outcome"] == "skipped" and rows[dup_uid]["outputs"] == "none"
    assert f"as series {original_uid} of this study, already analysed" in rows[dup_uid]["job"]["error"]
    # the MPR: basic only, reported skipped with the reason; no outputs
    assert decisions(mpr_uid) == {"basic": (True, "default: derived reformat"),
                                  "classical": (False, "default: derived reformat")}
    assert rows[mpr_uid]["job"]["outcome"] == "skipped" and rows[mpr_uid]["outputs"] == "none"
    assert rows[mpr_uid]["job"]["error"] == (
        "not selected: classical: default: skipped, derived reformat (ImageType DERIVED\\SECONDARY\\AXIAL\\MPR)")
    # the dose screen: nothing at all
    assert decisions(dose_uid) == {"basic": (False, "default: dose screen"),
                                   "classical": (False, "default: dose screen")}
    assert "dose screen (SeriesDescription 'Dose Report')" in rows[dose_uid]["job"]["error"]
    # the thin series: the configured skip rule names itself for classical
    assert decisions(thin_uid) == {"basic": (True, "default"), "classical": (False, "no classical on thin slices")}
    assert rows[thin_uid]["job"]["error"] == (
        "not selected: classical: skipped by [[selection]] rule 'no classical on thin slices'")

    with node.db.session() as s:
        sid = {x.series_instance_uid: x.id for x in s.scalars(select(Series))}
        runs = {uid: sorted(m for m in s.scalars(select(AnalysisRun.model).where(AnalysisRun.series_id == i)))
                for uid, i in sid.items()}
        outputs = {uid: s.scalar(select(OutputObject.id).join(Job).where(Job.series_id == i).limit(1)) is not None
                   for uid, i in sid.items()}
        trend = {uid: sorted(s.scalars(select(TrendPoint.metric).where(TrendPoint.series_instance_uid == uid)))
                 for uid in sid}
    assert runs[original_uid] == ["basic", "classical"]
    assert runs[mpr_uid] == ["basic"] and runs[thin_uid] == ["basic"]
    assert runs[dup_uid] == [] and runs[dose_uid] == []
    assert outputs == {original_uid: True, dup_uid: False, mpr_uid: False, dose_uid: False, thin_uid: False}
    # a skipped series with its basic statistics still has its trend row; the others none
    assert "body_mean_hu" in trend[mpr_uid] and "body_mean_hu" in trend[thin_uid]
    assert "ctdivol_mgy" in trend[original_uid]
    assert trend[dup_uid] == [] and trend[dose_uid] == []
    # the MPR keeps its source's description and reconstruction but trends apart from it
    with node.db.session() as s:
        protocol = {uid: set(s.scalars(select(TrendPoint.protocol).where(TrendPoint.series_instance_uid == uid)))
                    for uid in (original_uid, mpr_uid)}
    (orig_key,), (mpr_key,) = protocol[original_uid], protocol[mpr_uid]
    name, rest = orig_key.split(" | ", 1)
    assert mpr_key == f"{name} [MPR] | {rest}"

    # the text form names the rules too
    r = qa_node("--config", str(node.config_file), "status", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "    selection: basic runs (default), classical skipped (no classical on thin slices)" in r.stdout
