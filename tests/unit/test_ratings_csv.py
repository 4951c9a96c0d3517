"""Ratings CSV (node/ratings.py): good rows read back exactly, every bad row is reported with its line
number (none skipped silently, nothing imported), and the database round trip (import -> export)
keeps every field. Real DICOM files from the shared data."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node import ratings
from storage.db import Database
from tests.helpers import PHANTOM_5MM, WG04, require

ENHANCED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "corpus" / "dicomParser" / \
    "Acme_EnhancedCT_2frames"


@pytest.fixture()
def files(tmp_path):
    require(WG04)
    require(PHANTOM_5MM)
    d = tmp_path / "imgs"
    d.mkdir()
    ct1 = d / "ct1.dcm"
    ct1.write_bytes((WG04 / "CT1_UNC").read_bytes())
    ph = sorted(PHANTOM_5MM.iterdir())[0]
    return {"ct1": ct1, "phantom": ph, "ct1_uid": str(pydicom.dcmread(ct1, stop_before_pixels=True).SOPInstanceUID)}


def _write(p: Path, text: str) -> Path:
    p.write_text(text, encoding="utf-8")
    return p


def test_good_rows_read_back(tmp_path, files):
    csvp = _write(tmp_path / "r.csv",
                  "path,score,rater,sop_instance_uid\n"
                  f"imgs/ct1.dcm,3,alice,{files['ct1_uid']}\n"
                  f"{files['phantom']},2.6667,,\n")
    rows = ratings.read_ratings_csv(csvp)
    assert len(rows) == 2
    a, b = rows
    assert a.path == files["ct1"].resolve() and a.score == 3.0 and a.rater == "alice" and a.line == 2
    assert a.sop_instance_uid == files["ct1_uid"]
    ds = pydicom.dcmread(files["phantom"], stop_before_pixels=True)
    assert b.path == files["phantom"].resolve() and b.score == pytest.approx(2.6667) and b.rater is None
    assert b.sop_instance_uid == ds.SOPInstanceUID and b.series_instance_uid == ds.SeriesInstanceUID
    assert b.line == 3


def test_every_bad_row_reported_with_its_line(tmp_path, files):
    (tmp_path / "notdicom.dcm").write_text("hello")
    csvp = _write(tmp_path / "bad.csv",
                  "path,score,frame,sop_instance_uid\n"
                  "imgs/ct1.dcm,3,,\n"  # 2 good
                  "imgs/ct1.dcm,4.5,,\n"  # 3 out of range
                  "imgs/ct1.dcm,good,,\n"  # 4 not a number
                  "missing.dcm,2,,\n"  # 5 no file
                  ",2,,\n"  # 6 empty path
                  "imgs/ct1.dcm,-0.1,,\n"  # 7 below range
                  "imgs/ct1.dcm,nan,,\n"  # 8 nan
                  "notdicom.dcm,1,,\n"  # 9 not DICOM
                  "imgs/ct1.dcm,2,0,\n"  # 10 bad frame
                  "imgs/ct1.dcm,2,2,\n"  # 11 frame beyond the file
                  "imgs/ct1.dcm,2,,1.2.3.4\n"  # 12 UID of another image
                  "imgs/ct1.dcm,2,,1.02.3\n"  # 13 invalid UID
                  "imgs/ct1.dcm,1\n")  # 14 good (short row)
    with pytest.raises(ratings.RatingsFileError) as e:
        ratings.read_ratings_csv(csvp)
    errs = e.value.errors
    assert [int(x.split(":")[0].removeprefix("line ")) for x in errs] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert "outside [0, 4]" in errs[0] and "not a number" in errs[1] and "no such file" in errs[2]
    assert "path is empty" in errs[3] and "outside" in errs[4] and "outside" in errs[5]
    assert "not a readable DICOM" in errs[6] and "not a frame number" in errs[7]
    assert "has 1 frame" in errs[8] and "does not match" in errs[9] and "not a valid UID" in errs[10]


def test_missing_column_and_empty_file(tmp_path):
    with pytest.raises(ratings.RatingsFileError) as e:
        ratings.read_ratings_csv(_write(tmp_path / "a.csv", "file,score\nx.dcm,2\n"))
    assert e.value.errors == ["line 1: missing column(s) path (header must name at least path,score)"]
    with pytest.raises(ratings.RatingsFileError) as e:
        ratings.read_ratings_csv(_write(tmp_path / "b.csv", "path,score\n"))
    assert e.value.errors == ["no ratings (only a header)"]


def test_multiframe_needs_a_frame(tmp_path):
    f = require(ENHANCED)
    mf = f / "CT0012.explicit_little_endian.dcm"
    csvp = _write(tmp_path / "m.csv", f"path,score,frame\n{mf},2,\n{mf},3,2\n")
    with pytest.raises(ratings.RatingsFileError) as e:
        ratings.read_ratings_csv(csvp)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith("line 2: the file has 2 frames")


def test_import_export_round_trip(tmp_path, files):
    db = Database("sqlite:///" + str(tmp_path / "n.sqlite"))
    db.create_all()
    csvp = _write(tmp_path / "r.csv", f"path,score,rater\nimgs/ct1.dcm,3,alice\n{files['phantom']},1.5,\n")
    rows = ratings.read_ratings_csv(csvp)
    assert ratings.import_ratings(db, rows) == 2
    rid = ratings.add_rating(db, rater="bob", score=0, path=files["ct1"], sop_instance_uid=files["ct1_uid"])
    rid2 = ratings.add_rating(db, rater="bob", score=4, path=files["ct1"], sop_instance_uid=files["ct1_uid"])
    assert ratings.withdraw_rating(db, rid2, rater="alice") is False  # not alice's
    assert ratings.withdraw_rating(db, rid2, rater="bob") is True
    assert ratings.withdraw_rating(db, rid2, rater="bob") is False  # already withdrawn
    out = tmp_path / "out" / "x.csv"
    out.parent.mkdir()
    assert ratings.export_ratings(db, out) == 3
    back = ratings.read_ratings_csv(out)
    assert [(r.path, r.score, r.rater, r.sop_instance_uid) for r in back] == [
        (files["ct1"].resolve(), 3.0, "alice", files["ct1_uid"]),
        (files["phantom"].resolve(), 1.5, None, rows[1].sop_instance_uid),
        (files["ct1"].resolve(), 0.0, "bob", files["ct1_uid"]),
    ]
    assert rid < rid2
    with pytest.raises(ValueError, match="outside"):
        ratings.add_rating(db, rater="bob", score=5, path=files["ct1"], sop_instance_uid=None)


def test_cli_import_lists_every_bad_row_and_imports_nothing(tmp_path, files):
    from tests.helpers import qa_node, write_config

    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "data")
    bad = _write(tmp_path / "bad.csv", "path,score\nimgs/ct1.dcm,2\nimgs/ct1.dcm,7\nnope.dcm,1\n")
    proc = qa_node("--config", str(cfg), "ratings", "import", str(bad))
    assert proc.returncode == 2
    err = proc.stderr.splitlines()
    assert err[0].endswith("bad.csv: 2 problem(s); nothing imported:")
    assert err[1].startswith("  line 3: score '7' is outside [0, 4]") and err[2].startswith("  line 4: no such file")
    assert "Traceback" not in proc.stderr
    good = _write(tmp_path / "good.csv", "path,score,rater\nimgs/ct1.dcm,2.5,\n")
    proc = qa_node("--config", str(cfg), "ratings", "import", str(good))
    assert proc.returncode == 0 and "1 rating(s) imported" in proc.stdout, proc.stderr
    out = tmp_path / "x.csv"
    proc = qa_node("--config", str(cfg), "ratings", "export", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == ["path,score,rater,frame,sop_instance_uid",
                                            f"{files['ct1'].resolve()},2.5,,,{files['ct1_uid']}"]


def test_rate_items_from_the_store_and_sampling(tmp_path):
    """qa-node rate samples from received series: every frame of a multi-frame instance is an item,
    --series narrows to those series, an invalid UID is refused, the sample is seeded."""
    from node import rate
    from storage.models import Instance, Series

    db = Database("sqlite:///" + str(tmp_path / "n.sqlite"))
    db.create_all()
    with db.session() as s:
        a = Series(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3")
        b = Series(series_instance_uid="1.2.3.2", study_instance_uid="1.2.3")
        s.add_all([a, b])
        s.flush()
        for k, (ser, frames) in enumerate(((a, 1), (a, 1), (b, 3))):
            s.add(Instance(series_id=ser.id, sop_instance_uid=f"1.2.3.9.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", rel_path=f"store/x/{k}.dcm", size_bytes=1,
                           sha256="0" * 64, number_of_frames=frames))
    items = rate.items_from_store(db, tmp_path / "data")
    assert [(i.sop_instance_uid, i.frame, i.series_instance_uid) for i in items] == [
        ("1.2.3.9.0", None, "1.2.3.1"), ("1.2.3.9.1", None, "1.2.3.1"),
        ("1.2.3.9.2", 1, "1.2.3.2"), ("1.2.3.9.2", 2, "1.2.3.2"), ("1.2.3.9.2", 3, "1.2.3.2")]
    assert items[0].path == (tmp_path / "data" / "store/x/0.dcm")
    only_b = rate.items_from_store(db, tmp_path / "data", ["1.2.3.2"])
    assert {i.series_instance_uid for i in only_b} == {"1.2.3.2"} and len(only_b) == 3
    with pytest.raises(ValueError):
        rate.items_from_store(db, tmp_path / "data", ["../etc"])
    s1, s2 = rate.sample_items(items, 3, seed=4), rate.sample_items(items, 3, seed=4)
    assert s1 == s2 and len(s1) == 3 and len(set(s1)) == 3
    assert sorted(rate.sample_items(items, 0), key=items.index) == items
