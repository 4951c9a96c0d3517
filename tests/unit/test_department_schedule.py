"""bench/department.py's day: the mix, seeded reproducibility, valid UIDs, slice counts, the exam
timing, the sample, the series made from real slices (geometry, pixels), the cost fit and the day's
queue simulation against hand-computed values."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
from pydicom.uid import UID

from tests.helpers import PHANTOM_1MM, PHANTOM_5MM, REPO, require


@pytest.fixture(scope="module")
def dept():
    name = "_bench_department"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "department.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def day(dept):
    return dept.make_day(0)


def exams_of(day):
    exams = defaultdict(list)
    for s in day:
        exams[s.exam].append(s)
    for e in exams.values():
        e.sort(key=lambda s: s.local)
    return exams


def test_day_mix_and_slice_counts(dept, day):
    assert len(day) == 1500
    assert {s.scanner for s in day} == {f"CT{i}" for i in range(1, 6)}
    exams = exams_of(day)
    kinds = Counter(s.kind for s in day)
    n_exams = len(exams)
    assert 200 <= n_exams <= 250  # ~6.7 series per exam
    # every exam but possibly the day's last (cut short at 1,500) is complete: one localizer first,
    # a thick and a thin series per acquisition, MPRs in pairs
    full = [e for e in exams.values() if e[0].exam != max(exams)]
    for e in full:
        k = Counter(s.kind for s in e)
        assert k["localizer"] == 1 and e[0].kind == "localizer"
        assert k["thick"] == k["thin"] in (1, 2, 3)
        assert k["mpr_cor"] == k["mpr_sag"] in (0, 1)
        assert k["dose"] <= 1 and k["duplicate"] <= 1
    assert 0.80 <= kinds["mpr_cor"] / n_exams <= 0.90
    assert 0.90 <= kinds["dose"] / n_exams <= 1.0
    assert 0.02 <= kinds["duplicate"] / n_exams <= 0.15
    assert 1.3 <= kinds["thin"] / n_exams <= 1.7
    for e in exams.values():
        for s in e:
            if s.kind == "localizer":
                assert 1 <= s.n_slices <= 3
            elif s.kind == "thin":
                assert 300 <= s.n_slices <= 600 and s.thickness_mm in dept.THIN_MM
                thick = [t for t in e if t.kind == "thick" and t.phase == s.phase]
                assert len(thick) == 1 and thick[0].n_slices == max(20, round(s.n_slices * s.thickness_mm / 5))
                assert thick[0].thickness_mm == 5.0
            elif s.kind in ("mpr_cor", "mpr_sag"):
                assert 40 <= s.n_slices <= 120 and e[s.source].kind == "thin"
            elif s.kind == "dose":
                assert s.n_slices == 1
            elif s.kind == "duplicate":
                src = e[s.source]
                assert src.kind in ("thin", "thick")
                assert (s.n_slices, s.thickness_mm, s.frame_uid) == (src.n_slices, src.thickness_mm, src.frame_uid)
                assert s.arrival_s == pytest.approx(src.arrival_s + 600)
    assert min(s.n_slices for s in day) == 1 and max(s.n_slices for s in day) <= 600


def test_day_uids_are_valid_unique_and_seeded(dept, day):
    uids = [s.series_uid for s in day]
    assert len(set(uids)) == len(uids)
    for s in day[:200]:
        for u in (s.study_uid, s.series_uid, s.frame_uid):
            assert UID(u).is_valid and len(u) <= 64
    assert {s.study_uid for s in day if s.exam == day[0].exam} == {day[0].study_uid}
    assert len({s.study_uid for s in day}) == len({s.exam for s in day})
    again = dept.make_day(0)
    assert again == day
    other = dept.make_day(1)
    assert [s.series_uid for s in other] != uids and Counter(s.kind for s in other) != Counter(s.kind for s in day)


def test_day_timing(dept, day):
    starts = defaultdict(list)
    for e in exams_of(day).values():
        starts[e[0].scanner].append(e[0].arrival_s - 60)  # the localizer comes 1 min after the start
    for ts in starts.values():
        ts.sort()
        assert all(b - a >= dept.EXAM_GAP_S - 1e-6 for a, b in zip(ts, ts[1:]))
    share = dept.day_summary(day)["share_08_18"]
    assert 0.65 <= share <= 0.90  # the profile gives 78 % of exam starts in 08-18
    assert [s.index for s in day] == list(range(1500))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(day, day[1:]))


def test_sample_whole_exams_every_kind(dept, day):
    s = dept.sample_exams(day, 10, 9)
    assert s == dept.sample_exams(day, 10, 9)
    assert len(s) >= 10
    exams = exams_of(day)
    for e in {x.exam for x in s}:
        assert sorted(x.index for x in s if x.exam == e) == sorted(x.index for x in exams[e])
    assert set(dept.KINDS) <= {x.kind for x in s}
    assert len({x.scanner for x in s}) >= 2


def test_pingpong_walks_back_and_forth(dept):
    seq = [dept._pingpong(i, 4) for i in range(9)]
    assert seq == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert dept._pingpong(5, 1) == 0


def test_fit_line_and_day_simulation(dept):
    a, b = dept.fit_line([(100, 15.0), (300, 35.0), (500, 55.0)])
    assert a == pytest.approx(5.0) and b == pytest.approx(0.1)
    P = dept.SeriesPlan
    day = [P(index=0, scanner="CT1", exam=0, kind="thin", n_slices=100, thickness_mm=1.0, arrival_s=0.0),
           P(index=1, scanner="CT2", exam=1, kind="thin", n_slices=100, thickness_mm=1.0, arrival_s=0.0),
           P(index=2, scanner="CT1", exam=0, kind="thick", n_slices=20, thickness_mm=5.0, arrival_s=0.0)]
    # CT1 sends 100 then 20 instances at 0.1 s each: queued at 10 + 30 and 12 + 30 s; CT2's at 40 s
    one = dept.simulate_day(day, lambda s: 100.0, 1, 0.1, 30.0, 2.0)
    assert one["last_analysed_s"] == 340  # 40 -> 140 -> 240 -> 340 on one worker
    assert one["max_waiting"] == 2 and one["clears_before_0800_next_day"]
    assert one["latency_median_s"] == 232  # 132, 232, 330 s (results + send, from the end of each push)
    two = dept.simulate_day(day, lambda s: 100.0, 2, 0.1, 30.0, 2.0)
    assert two["last_analysed_s"] == 240 and two["max_waiting"] == 1
    # three days in a row: nothing carried over, the last day as the first
    again = dept.simulate_day(day, lambda s: 100.0, 1, 0.1, 30.0, 2.0, days=3)
    assert again["last_analysed_s"] == 340 and again["latency_median_s"] == 232
    # a day longer than a day: each series 40,000 s -> the third day's last is analysed 2.5 days late
    late = dept.simulate_day(day, lambda s: 40000.0, 1, 0.1, 30.0, 2.0, days=3)
    assert late["last_analysed_s"] == 40 + 9 * 40000 - 2 * 86400 and not late["clears_before_0800_next_day"]


def test_series_from_real_slices(dept, tmp_path):
    require(PHANTOM_1MM)
    require(PHANTOM_5MM)
    import pydicom

    src = dept.Sources()
    P = dept.SeriesPlan
    thin = P(index=0, scanner="CT3", exam=7, kind="thin", n_slices=143, thickness_mm=0.625, arrival_s=36000.0,
             local=1, study_uid=dept._uid("t", "study"), series_uid=dept._uid("t", "thin"),
             frame_uid=dept._uid("t", "frame"))
    cor = P(index=1, scanner="CT3", exam=7, kind="mpr_cor", n_slices=4, thickness_mm=3.0, arrival_s=36100.0,
            source=1, local=2, study_uid=thin.study_uid, series_uid=dept._uid("t", "cor"), frame_uid=thin.frame_uid)
    exam = [thin, thin, cor]
    assert dept.write_series(thin, exam, src, tmp_path / "thin") == 143
    assert dept.write_series(cor, exam, src, tmp_path / "cor") == 4
    files = sorted((tmp_path / "thin").iterdir())
    dss = [pydicom.dcmread(f) for f in files[138:143]]  # across the turn of the 140 source slices
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert np.allclose(np.diff(z), 0.625)
    assert [d.InstanceNumber for d in dss] == [139, 140, 141, 142, 143]
    assert all(d.SeriesInstanceUID == thin.series_uid and d.StationName == "CT3" for d in dss)
    assert len({d.SOPInstanceUID for d in dss}) == 5 and all(UID(d.SOPInstanceUID).is_valid for d in dss)
    # pixels: slice i is source slice pingpong(i): 140 -> source 138 (back down)
    assert np.array_equal(dss[2].pixel_array, src.volume[138])
    c = [pydicom.dcmread(f) for f in sorted((tmp_path / "cor").iterdir())]
    assert list(c[0].ImageType) == ["DERIVED", "SECONDARY", "MPR"]
    assert [float(v) for v in c[0].ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    rows = int(143 * 0.625 // 3)
    assert (c[0].Rows, c[0].Columns) == (rows, 512)
    j = int(round(0.5 * 512 / 4))
    # the coronal plane y = j of the volume, z sampled every 3 mm from the top down
    zk = [dept._pingpong(int(round(k * 3 / 0.625)), 140) for k in range(rows)][::-1]
    assert np.array_equal(c[0].pixel_array, src.volume[zk, j, :])
