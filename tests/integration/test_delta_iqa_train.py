"""``qa-node train delta_iqa`` end to end on SYNTHETIC ratings whose truth is known (real slices of
several series degraded at 5 graded levels, each rated by its level; not radiologist ratings).

A small fast version of bench/delta_iqa_synthetic.py, cut for CI: one slice per series, the fast
image-domain noise (the bench uses the projection-domain noise), the default absolute levels (a
level is the total noise in the body; the sharp-kernel Toshiba slice, about 120 HU of its own, is
left out and listed so), and a reduced-width network (width 0.25: the published one needs minutes;
the bench measures it) trained for 3 epochs with the trainer's recipe (warm-up + cosine,
flips/rotations/shifts); the held-out images belong to series the network never saw. Asserted: the
held-out SROCC the command prints and writes into the model card is a real figure (SROCC >= 0.8;
while a trainer that learns nothing scores about 0), the card names the synthetic labels, the data and the exact command, and the
weights give the platform model (analysis/models/delta_iqa.py) scores that rank the held-out images
as the card says. A bad ratings file stops the command with every bad row listed (exit 2)."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import delta_iqa as dq
from analysis.training import delta_iqa as tr
from node.ratings import read_ratings_csv
from tests.helpers import SHARED_DATA, qa_node, require


SOURCES = (  # 8 series, one slice each (7 quiet enough for the absolute levels)
    "corpus/dcmqi/GE_LightSpeedUltra_3slice",
    "corpus/cornerstone3D/GE_HiSpeedCTi_TS_LittleEndianExplicit",
    "corpus/pydicom-data/Anon_pancreas_explicitVR_UN",
    "corpus/pylibjpeg-data/GE_coreload_693_J2K_lossy",
    "corpus/pylibjpeg-data/Hitachi_Supria_J2K_pixrep_tilt",
    "corpus/pylibjpeg-data/Toshiba_Aquilion_J2K_OpenJPEGv2",
    "dicom/wg04/CT1_UNC",
    "dicom/wg04/CT2_UNC",
)


def test_train_on_synthetic_levels_generalises_to_unseen_series(tmp_path):
    require(SHARED_DATA)
    files = []
    for rel in SOURCES:
        p = require(SHARED_DATA / rel)
        files.extend([p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix == ".dcm")[:1])
    csv_path = tr.make_synthetic_ratings(files, tmp_path / "syn", seed=0, realisations=2, noise="image")
    rows = read_ratings_csv(csv_path)
    with (csv_path.parent / "sources.csv").open(newline="") as fh:
        used = {r["source"]: r["used"] == "yes" for r in csv.DictReader(fh)}
    assert sorted(used) == sorted(map(str, files))
    assert [Path(k).parent.name for k, v in used.items() if not v] == ["Toshiba_Aquilion_J2K_OpenJPEGv2"]
    assert len(rows) == (len(files) - 1) * 10 and sorted({r.score for r in rows}) == [0, 1, 2, 3, 4]
    out = tmp_path / "w" / "delta_synthetic.pt"
    proc = qa_node("train", "delta_iqa", "--ratings", str(csv_path), "--out", str(out), "--epochs", "3",
                   "--width", "0.25", "--lr", "2e-3", "--holdout", "0.25", "--labels", "synthetic", "--seed", "0",
                   "--threads", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"held-out \((\d+) images of (\d+) series\): PLCC (\S+)  SROCC (\S+)  KROCC (\S+)", proc.stdout)
    assert m, proc.stdout
    n_held, n_series, plcc, srocc, krocc = int(m[1]), int(m[2]), float(m[3]), float(m[4]), float(m[5])
    assert n_series >= 2 and n_held >= 20
    assert srocc >= 0.8 and krocc > 0.6 and plcc > 0.6, proc.stdout
    card = tr.card_path(out).read_text()
    assert "SYNTHETIC-DEGRADATION WEIGHTS" in card and "not radiologist" in card
    assert "TOTAL noise in the body" in card and "7 of 8 source slices used" in card
    assert "left out: Toshiba_Aquilion_J2K_OpenJPEGv2/" in card
    assert f"`{csv_path}`" in card and "qa-node train delta_iqa --ratings" in card and "--labels synthetic" in card
    row = re.search(r"^\| (-?[\d.]+) \| (-?[\d.]+) \| (-?[\d.]+) \| (-?[\d.]+) \|$", card, re.M)
    assert row and np.allclose([float(v) for v in row.groups()[:3]], [plcc, srocc, krocc], atol=6e-4)
    assert "REDUCED width" in card
    # the platform model with these weights ranks the held-out images as the trainer measured
    from analysis.models import delta_iqa as model

    loaded = dq.load_model(out)
    assert loaded.labels == "synthetic"
    data = tr.load_rated_images(rows)
    _, held = tr.split_by_series(data.groups, 0.25, 0)
    assert len(held) == n_held
    probs = dq.predict_probs(loaded.net, data.x[held].astype(np.float32) * 400.0 - 160.0)
    again = dq.correlations(dq.expected_score(probs), data.scores[held])
    assert again["srocc"] == pytest.approx(srocc, abs=2e-3)

    class Vol:
        hu = data.x[held[:4]].astype(np.float32) * 400.0 - 160.0
        n_slices = 4

    class Ctx:
        device = "cpu"

    res = model.run(Vol(), Ctx(), model.Options(weights=str(out), max_slices=0))
    assert res.series_metrics["delta_iqa_score"] == pytest.approx(float(dq.expected_score(probs[:4]).mean()), abs=1e-4)
    assert "labels=synthetic" in res.parameters


def test_bad_ratings_file_lists_every_row(tmp_path):
    require(SHARED_DATA)
    bad = tmp_path / "r.csv"
    bad.write_text(f"path,score\n{SHARED_DATA / 'dicom/wg04/CT1_UNC'},5\nmissing.dcm,2\n")
    proc = qa_node("train", "delta_iqa", "--ratings", str(bad), "--out", str(tmp_path / "w.pt"), "--no-progress")
    assert proc.returncode == 2
    assert "line 2: score '5' is outside [0, 4]" in proc.stderr and "line 3: no such file 'missing.dcm'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w.pt").exists()
