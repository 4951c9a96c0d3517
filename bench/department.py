"""A department's day, compressed: 5 scanners, 1,500 series, pushed by DCMTK storescu to `qa-node serve`.

The day (``make_day``, seeded): 5 scanners CT1..CT5 (AE title = StationName = the ``[[scanners]]``
name), exams until the day holds 1,500 series. Each exam is, in the order a scanner sends it:

- one localizer series of 1-3 images (AP, lateral, a second AP), at +1 min from the exam's start;
- 1 acquisition (60 % of exams), 2 (30 %) or 3 (10 %), 1.5 min apart from +4 min, each sent as a
  thick 5 mm axial series (1 min after the acquisition; z extent of the thin one / 5 mm slices) and a
  thin axial series (2 min after; 300-600 slices of 0.6, 0.625, 0.75, 1.0 or 1.25 mm);
- coronal and sagittal MPRs of the first acquisition (85 % of exams; ImageType
  DERIVED\\SECONDARY\\MPR, 40-120 images of 3 mm, 2 and 2.5 min after its thin series);
- a dose screen (95 %; one CT-class image, ImageType DERIVED\\SECONDARY\\SCREEN SAVE, "Dose Report"),
  1 min after the last series;
- sometimes (8 %) a duplicate reconstruction: the first thin (or thick) series sent again 10 min
  later under a new Series Instance UID (same images, same reconstruction).

About 6.7 series per exam, so ~223 exams, ~45 per scanner. Exam start times are drawn per scanner
from an hourly profile of the working day (weights per hour 00-23: 1,1,1,1,1,1,1, 4,9,10,10,9,6,8,
9,9,8,6,4,3,2,2,1,1: 78 % of exams between 08:00 and 18:00, peaks mid-morning and mid-afternoon, the
lunch dip, a thin night of emergencies), then pushed apart to at least 10 min from the previous exam
of the same scanner (one patient on the table at a time). A scanner sends one series at a time, in
order: a series whose time comes while the previous one is still being sent waits for it.

Series are made from real slices, re-UIDed and re-headered: axial series from the shared Philips
phantom (the 140 slices of 1 mm for thin series, the 28 of 5 mm for thick ones, taken back and
forth along z to the slice count; positions, thickness and spacing consistent with the count), MPRs
reformatted from that 1 mm volume (coronal / sagittal planes, their geometry from the volume), the
localizer from the corpus (Philips Brilliance 64 scout, JPEG 2000 as the scanner wrote it), the dose
screen's pixels a real phantom slice (a stand-in for the rendered dose table). New Study / Series /
SOP Instance / Frame of Reference UIDs (valid, seeded), patient, accession, station, series number
and description per exam; referenced-image sequences and private tags dropped.

``--sample N`` replays whole exams of that day drawn at random (seeded; scanners spread; at least
one duplicate reconstruction so that every kind is measured) until N series, each series pushed by
storescu (one association per series, the scanners concurrently) at its arrival time scaled down by
``--speed K`` (the replay starts at the first sampled arrival). Before the replay, a reference: one
thin series of 450 slices pushed and analysed alone on the same node (nothing else queued or
arriving): the no-contention reference the sample's figures are set against.

The node: `qa-node serve`, SQLite, the shipped config.toml's models (basic, classical, n2q, d2iqa,
their default options), default selection rules, ``stable_age_s`` 30, ``--workers`` analysis
workers; the PACS a local Orthanc on loopback; every output marked sent is looked up in Orthanc.

Printed (and written as JSON with ``--json``): per series kind, the series, the analysis seconds (job
start to finish) and the time from the last instance received (the node's index) to the last of its
outputs stored in the PACS (median, p95); the queue depth over the run (sampled from the database
every 2 s); the node's CPU (its processes, workers included) and RSS; the load average. Then what
it implies for the day: the worker-seconds the day needs,

    S_w = sum over the day's series of t_w(series)

with t_w the analysis seconds measured at ``--workers w`` (full-model series: a + b * slices, fitted
by least squares to the sample's and the reference's full-model jobs; other kinds: their measured
mean per series), and the machines like this one the day needs at w workers,

    machines_w = ceil(S_w / (w * 86,400 s))

(w workers busy around the clock). A queue simulation of the whole day on one machine (the day's
arrivals at their real times, w FIFO workers, each series queued when its push ends plus
stable_age_s, the measured t_w) says when the day's last series is analysed and the latency a real
day would see.

    .venv/bin/python bench/department.py --schedule                     # the day's mix only
    .venv/bin/python bench/department.py --workers 1 --sample 10 --sample-seed 9 --speed 60 \\
        --ref-slices 300 --gen-dir /tmp/ctqa-dept --json bench/results/department_w1.json
    .venv/bin/python bench/department.py --workers 2 --sample 10 --sample-seed 9 --speed 120 \\
        --ref-slices 150 --gen-dir /tmp/ctqa-dept --json bench/results/department_w2.json
    .venv/bin/python bench/department.py --per-model --ref-slices 300 --json bench/results/department_per_model.json
    .venv/bin/python bench/department.py --from-json bench/results/department_w1.json   # re-derive the day
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import (PHANTOM_1MM, PHANTOM_5MM, SHARED_DATA, NodeProcess, free_port,  # noqa: E402
                           pacs_destination, write_config)

LOCALIZER = SHARED_DATA / "corpus" / "pylibjpeg-data" / "Philips_Brilliance64_localizer_J2K"
KINDS = ("localizer", "thick", "thin", "mpr_cor", "mpr_sag", "dose", "duplicate")
FULL_KINDS = ("thick", "thin")  # acquired axial originals: every model by default
HOUR_WEIGHTS = (1, 1, 1, 1, 1, 1, 1, 4, 9, 10, 10, 9, 6, 8, 9, 9, 8, 6, 4, 3, 2, 2, 1, 1)
EXAM_GAP_S = 600.0
THIN_MM = (0.6, 0.625, 0.75, 1.0, 1.25)
DAY_S = 86400.0
MODELS = '["basic", "classical", "n2q", "d2iqa"]'  # as the shipped config.toml
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root (generate_uid's default)


# -- the day's schedule --------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesPlan:
    index: int  # position in the day (by arrival)
    scanner: str
    exam: int
    kind: str
    n_slices: int
    thickness_mm: float
    arrival_s: float  # seconds after midnight: when the scanner starts sending it
    phase: int = 0
    source: int | None = None  # exam-local index of the series this one reformats / duplicates
    local: int = 0  # index within its exam
    study_uid: str = ""
    series_uid: str = ""
    frame_uid: str = ""


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _exam_contents(rng: random.Random) -> list[dict]:
    """One exam's series (kind, slices, thickness, offset from the exam's start, phase, source)."""
    out: list[dict] = [dict(kind="localizer", n=rng.choice((1, 2, 2, 3)), mm=2.0, at=60.0, phase=0, source=None)]
    phases = rng.choices((1, 2, 3), weights=(60, 30, 10))[0]
    first_thin = first_thick = None
    last = 60.0
    for p in range(phases):
        acq = 240.0 + 90.0 * p
        n_thin, mm = rng.randint(300, 600), rng.choice(THIN_MM)
        thick = dict(kind="thick", n=max(20, round(n_thin * mm / 5.0)), mm=5.0, at=acq + 60.0, phase=p, source=None)
        thin = dict(kind="thin", n=n_thin, mm=mm, at=acq + 120.0, phase=p, source=None)
        out += [thick, thin]
        if p == 0:
            first_thick, first_thin = len(out) - 2, len(out) - 1
        last = thin["at"]
    if rng.random() < 0.85:
        t = out[first_thin]["at"]
        out.append(dict(kind="mpr_cor", n=rng.randint(40, 120), mm=3.0, at=t + 120.0, phase=0, source=first_thin))
        out.append(dict(kind="mpr_sag", n=rng.randint(40, 120), mm=3.0, at=t + 150.0, phase=0, source=first_thin))
        last = t + 150.0
    if rng.random() < 0.95:
        out.append(dict(kind="dose", n=1, mm=0.0, at=last + 60.0, phase=0, source=None))
    if rng.random() < 0.08:
        src = first_thin if rng.random() < 0.5 else first_thick
        out.append(dict(kind="duplicate", n=out[src]["n"], mm=out[src]["mm"], at=out[src]["at"] + 600.0, phase=0,
                        source=src))
    return out


def _start_time(rng: random.Random) -> float:
    hour = rng.choices(range(24), weights=HOUR_WEIGHTS)[0]
    return hour * 3600.0 + rng.random() * 3600.0


def make_day(seed: int = 0, n_series: int = 1500, n_scanners: int = 5) -> list[SeriesPlan]:
    """The day's series (exactly ``n_series``), sorted by arrival; deterministic for a seed."""
    rng = random.Random(seed)
    scanners = [f"CT{i + 1}" for i in range(n_scanners)]
    exams: list[tuple[str, list[dict]]] = []
    total = 0
    while total < n_series:
        contents = _exam_contents(rng)
        contents = contents[:n_series - total]  # the day's last exam may be cut short
        exams.append((scanners[len(exams) % n_scanners], contents))
        total += len(contents)
    starts: dict[str, list[float]] = {}
    for sc in scanners:
        n = sum(1 for s, _ in exams if s == sc)
        ts = sorted(_start_time(rng) for _ in range(n))
        for i in range(1, len(ts)):
            ts[i] = max(ts[i], ts[i - 1] + EXAM_GAP_S)
        starts[sc] = ts
    taken: Counter = Counter()
    raw = []
    for e, (sc, contents) in enumerate(exams):
        t0 = starts[sc][taken[sc]]
        taken[sc] += 1
        study = _uid(seed, "study", e)
        frames = [_uid(seed, "frame", e, p) for p in range(3)]
        for j, c in enumerate(contents):
            src = c["source"] if c["source"] is not None and c["source"] < len(contents) else None
            kind = c["kind"]
            frame = frames[contents[src]["phase"]] if kind == "duplicate" and src is not None else frames[c["phase"]]
            raw.append(dict(scanner=sc, exam=e, kind=kind, n_slices=c["n"], thickness_mm=c["mm"],
                            arrival_s=t0 + c["at"], phase=c["phase"], source=src, local=j, study_uid=study,
                            series_uid=_uid(seed, "series", e, j), frame_uid=frame))
    raw.sort(key=lambda r: (r["arrival_s"], r["exam"], r["local"]))
    return [SeriesPlan(index=i, **r) for i, r in enumerate(raw)]


def day_summary(day: list[SeriesPlan]) -> dict:
    by_kind = Counter(s.kind for s in day)
    slices = Counter()
    for s in day:
        slices[s.kind] += s.n_slices
    exams = {s.exam for s in day}
    work = sum(1 for s in day if 8 * 3600 <= s.arrival_s < 18 * 3600)
    return {
        "series": len(day), "exams": len(exams), "scanners": len({s.scanner for s in day}),
        "series_per_kind": {k: by_kind.get(k, 0) for k in KINDS},
        "instances": sum(s.n_slices for s in day),
        "instances_per_kind": {k: slices.get(k, 0) for k in KINDS},
        "slices_range": [min(s.n_slices for s in day), max(s.n_slices for s in day)],
        "share_08_18": round(work / len(day), 3),
        "first_arrival": _hhmm(min(s.arrival_s for s in day)), "last_arrival": _hhmm(max(s.arrival_s for s in day)),
    }


def _hhmm(sec: float) -> str:
    d, r = divmod(int(sec), 86400)
    return f"{r // 3600:02d}:{r % 3600 // 60:02d}" + (f" (+{d} d)" if d else "")


def sample_exams(day: list[SeriesPlan], n: int, seed: int = 0) -> list[SeriesPlan]:
    """Whole exams drawn at random (seeded) until at least ``n`` series: scanners spread (an exam of
    a scanner not drawn yet first), at least one exam with a duplicate reconstruction."""
    rng = random.Random(f"sample-{seed}")
    by_exam: dict[int, list[SeriesPlan]] = defaultdict(list)
    for s in day:
        by_exam[s.exam].append(s)
    order = list(by_exam)
    rng.shuffle(order)
    chosen: list[int] = []
    used: set[str] = set()
    count = 0
    while count < n and len(chosen) < len(order):
        left = [e for e in order if e not in chosen]
        fresh = [e for e in left if by_exam[e][0].scanner not in used]
        e = (fresh or left)[0]
        chosen.append(e)
        used.add(by_exam[e][0].scanner)
        if len(used) == len({s.scanner for s in day}):
            used.clear()
        count += len(by_exam[e])
    if not any(s.kind == "duplicate" for e in chosen for s in by_exam[e]):
        others = {by_exam[e][0].scanner for e in chosen[:-1]}
        dup = [e for e in order if e not in chosen and any(s.kind == "duplicate" for s in by_exam[e])]
        dup.sort(key=lambda e: by_exam[e][0].scanner in others)  # a scanner not drawn yet first
        if dup:
            chosen[-1] = dup[0]
    return sorted((s for e in chosen for s in by_exam[e]), key=lambda s: s.index)


# -- making the series from real slices -----------------------------------------------------------

def _pingpong(i: int, n: int) -> int:
    """Index into n source slices walked back and forth: 0..n-1, n-2..0, 1.. (no jump in z)."""
    if n == 1:
        return 0
    period = 2 * n - 2
    k = i % period
    return k if k < n else period - k


class Sources:
    """The real slices the series are made of, read once."""

    def __init__(self) -> None:
        import numpy as np
        import pydicom

        def read(folder: Path):
            dss = [pydicom.dcmread(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != "LICENSE"]
            return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))

        self.thin = read(PHANTOM_1MM)
        self.thick = read(PHANTOM_5MM)
        self.localizer = [pydicom.dcmread(f) for f in sorted(LOCALIZER.iterdir()) if f.suffix == ".dcm"][0]
        self.volume = np.stack([d.pixel_array for d in self.thin])  # (z, y, x) stored values
        # the geometry as the scanner wrote it (the datasets are re-headered in place, series after series)
        self.thin_z0 = float(self.thin[0].ImagePositionPatient[2])
        self.thick_z0 = float(self.thick[0].ImagePositionPatient[2])
        self.xy0 = [float(v) for v in self.thin[0].ImagePositionPatient[:2]]
        self.spacing = float(self.thin[0].PixelSpacing[0])
        for d in (*self.thin, *self.thick, self.localizer):
            for kw in ("ReferencedImageSequence", "ReferencedPerformedProcedureStepSequence", "SourceImageSequence",
                       "ReferencedStudySequence", "IrradiationEventUID"):
                if kw in d:
                    delattr(d, kw)
            d.remove_private_tags()


def _header(ds, plan: SeriesPlan, *, series_uid: str, number: int, description: str, image_type: list[str]) -> None:
    e = plan.exam
    t0 = plan.arrival_s
    hh, mm, ss = int(t0 // 3600) % 24, int(t0 % 3600 // 60), int(t0 % 60)
    ds.PatientName, ds.PatientID = f"DEPT^EXAM{e:04d}", f"DEPT{e:05d}"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    ds.AccessionNumber, ds.StudyID = f"ACC{e:06d}", f"{e}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.study_uid, series_uid
    ds.FrameOfReferenceUID = plan.frame_uid
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        setattr(ds, kw, "20261201")
    for kw in ("SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime"):
        setattr(ds, kw, f"{hh:02d}{mm:02d}{ss:02d}")
    ds.StudyTime = ds.SeriesTime
    if "AcquisitionDateTime" in ds:
        ds.AcquisitionDateTime = f"20261201{hh:02d}{mm:02d}{ss:02d}"
    ds.StationName = plan.scanner
    ds.DeviceSerialNumber = f"9000{plan.scanner[-1]}"
    ds.InstitutionName = "Bench Department"
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ImageType = image_type


def _save(ds, folder: Path, i: int, sop_uid: str) -> None:
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = i + 1
    ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def write_series(plan: SeriesPlan, exam: list[SeriesPlan], src: Sources, folder: Path) -> int:
    """The plan's files in ``folder``; returns the file count."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    geom = exam[plan.source] if plan.kind == "duplicate" and plan.source is not None else plan
    kind = geom.kind if plan.kind == "duplicate" else plan.kind
    number = 100 * (plan.phase + 1) + plan.local
    if kind in ("thin", "thick"):
        stack = src.thin if kind == "thin" else src.thick
        z0 = src.thin_z0 if kind == "thin" else src.thick_z0
        desc = f"{'Thin' if kind == 'thin' else 'Thick'} {geom.thickness_mm:g} mm phase {plan.phase + 1}"
        for i in range(geom.n_slices):
            ds = stack[_pingpong(i, len(stack))]
            _header(ds, plan, series_uid=plan.series_uid, number=number, description=desc,
                    image_type=["ORIGINAL", "PRIMARY", "AXIAL"])
            z = round(z0 + i * geom.thickness_mm, 4)
            ds.ImagePositionPatient = [*src.xy0, z]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = z
            ds.SliceThickness = geom.thickness_mm
            ds.SpacingBetweenSlices = geom.thickness_mm
            _save(ds, folder, i, _uid(plan.series_uid, i))
        return geom.n_slices
    if kind in ("mpr_cor", "mpr_sag"):
        thin = exam[plan.source]
        extent = thin.n_slices * thin.thickness_mm
        rows = max(16, int(extent // 3.0))
        zk = [_pingpong(int(round(k * 3.0 / thin.thickness_mm)), len(src.thin)) for k in range(rows)]
        vol = src.volume[zk][::-1]  # image rows run down in z (head at the top)
        ds = src.thin[0]
        (x0, y0), dx = src.xy0, src.spacing
        z_top = src.thin_z0 + (rows - 1) * 3.0
        width = vol.shape[1]
        for i in range(plan.n_slices):
            j = int(round((i + 0.5) * width / plan.n_slices))
            j = min(width - 1, j)
            if kind == "mpr_cor":
                img = vol[:, j, :]
                iop, ipp = [1, 0, 0, 0, 0, -1], [x0, y0 + j * dx, z_top]
            else:
                img = vol[:, :, j]
                iop, ipp = [0, 1, 0, 0, 0, -1], [x0 + j * dx, y0, z_top]
            _header(ds, plan, series_uid=plan.series_uid, number=number,
                    description=f"{'Cor' if kind == 'mpr_cor' else 'Sag'} MPR 3 mm",
                    image_type=["DERIVED", "SECONDARY", "MPR"])
            ds.Rows, ds.Columns = img.shape
            ds.PixelSpacing = [3.0, dx]
            ds.ImageOrientationPatient = iop
            ds.ImagePositionPatient = [round(v, 4) for v in ipp]
            ds.SliceThickness = 3.0
            ds.SpacingBetweenSlices = round(width * dx / plan.n_slices, 3)
            if "SliceLocation" in ds:
                del ds.SliceLocation
            ds.PixelData = np.ascontiguousarray(img).astype(src.volume.dtype).tobytes()
            _save(ds, folder, i, _uid(plan.series_uid, i))
        ds.Rows = ds.Columns = 512  # the shared source back as it was
        ds.PixelData = src.volume[0].tobytes()
        ds.PixelSpacing, ds.ImageOrientationPatient = [dx, dx], [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, y0, src.thin_z0]
        ds.SliceThickness = ds.SpacingBetweenSlices = 1.0
        return plan.n_slices
    if kind == "localizer":
        ds = src.localizer
        for i in range(plan.n_slices):
            _header(ds, plan, series_uid=plan.series_uid, number=number, description="Scout",
                    image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1] if i == 1 else [1, 0, 0, 0, 0, -1]
            _save(ds, folder, i, _uid(plan.series_uid, i))
        return plan.n_slices
    if kind == "dose":
        mid = len(src.thin) // 2
        ds = src.thin[mid]
        ds.ImagePositionPatient = [*src.xy0, src.thin_z0 + mid]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = ds.SpacingBetweenSlices = 1.0
        _header(ds, plan, series_uid=plan.series_uid, number=999, description="Dose Report",
                image_type=["DERIVED", "SECONDARY", "SCREEN SAVE"])
        _save(ds, folder, 0, _uid(plan.series_uid, 0))
        return 1
    raise ValueError(f"unknown series kind {plan.kind!r}")


def generate(sample: list[SeriesPlan], day: list[SeriesPlan], root: Path, tag: str) -> dict[int, Path]:
    """Every sampled series in ``root/<index>`` (kept between runs: a manifest names what is there)."""
    manifest = root / "manifest.json"
    want = {str(s.index): s.series_uid for s in sample}
    if manifest.exists() and json.loads(manifest.read_text()).get(tag) == want:
        return {s.index: root / str(s.index) for s in sample}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = Sources()
    exams: dict[int, list[SeriesPlan]] = defaultdict(list)
    for s in day:
        exams[s.exam].append(s)
    for e in exams.values():
        e.sort(key=lambda s: s.local)
    t0 = time.monotonic()
    n = 0
    for s in sample:
        n += write_series(s, exams[s.exam], src, root / str(s.index))
    print(f"generated {len(sample)} series, {n} files in {time.monotonic() - t0:.0f} s into {root}")
    manifest.write_text(json.dumps({tag: want}))
    return {s.index: root / str(s.index) for s in sample}


def reference_plan(seed: int, n_slices: int = 450) -> tuple[SeriesPlan, list[SeriesPlan]]:
    ref = SeriesPlan(index=-1, scanner="CT1", exam=99999, kind="thin", n_slices=n_slices, thickness_mm=1.0,
                     arrival_s=0.0, study_uid=_uid(seed, "ref-study"), series_uid=_uid(seed, "ref-series"),
                     frame_uid=_uid(seed, "ref-frame"))
    return ref, [ref]


# -- measuring --------------------------------------------------------------------------------------

def _proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS MB of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, rss = 0.0, 0.0
    for p in _proc_tree(pid):
        try:
            parts = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(parts[11]) + int(parts[12])) / tick
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            pass
    return cpu, rss


class Monitor(threading.Thread):
    """Every ``period`` s: jobs waiting / running (the database), node CPU and RSS, load average."""

    def __init__(self, db: Path, pid: int, period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.db, self.pid, self.period = db, pid, period
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self._halt.is_set():
            row = {"t": round(time.time() - self.t0, 1)}
            try:
                con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                try:
                    counts = dict(con.execute("select state, count(*) from jobs group by state").fetchall())
                    receiving = con.execute("select count(*) from series where state = 'receiving'").fetchone()[0]
                finally:
                    con.close()
                row.update(waiting=counts.get("pending", 0), running=counts.get("running", 0), receiving=receiving)
            except sqlite3.Error:
                pass
            cpu, rss = _cpu_rss(self.pid)
            row.update(cpu_s=round(cpu, 1), rss_mb=round(rss), load1=os.getloadavg()[0])
            self.samples.append(row)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def _ts(v) -> float | None:
    if v is None:
        return None
    return datetime.fromisoformat(str(v)).replace(tzinfo=timezone.utc).timestamp()


def series_results(db: Path) -> dict[str, dict]:
    """Per Series Instance UID: instances, last received, its latest job and its deliveries."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "select s.id, s.series_instance_uid, s.n_instances, s.last_received_at, s.state, j.state, j.outcome, "
            "j.created_at, j.started_at, j.finished_at, j.worker, j.outputs, j.selection, j.error "
            "from series s left join jobs j on j.id = (select max(id) from jobs where series_id = s.id)").fetchall()
        outs = con.execute("select o.series_id, o.kind, o.sop_instance_uid, d.state, d.sent_at, o.created_at "
                           "from outputs o join deliveries d on d.output_id = o.id").fetchall()
    finally:
        con.close()
    res = {}
    by_id = {}
    for (sid, uid, n, last, sstate, jstate, outcome, created, started, finished, worker, outputs, sel,
         err) in rows:
        selected = []
        if sel:
            try:
                selected = [d["model"] for d in json.loads(sel).get("decisions", []) if d.get("selected")]
            except (ValueError, AttributeError):
                pass
        r = dict(n_instances=n, last_received=_ts(last), series_state=sstate, job_state=jstate, outcome=outcome,
                 queued=_ts(created), started=_ts(started), finished=_ts(finished), worker=worker,
                 outputs_state=outputs, models_selected=selected, error=(err or "")[:200], deliveries=[])
        res[uid] = r
        by_id[sid] = r
    for sid, kind, sop, state, sent, made in outs:
        if sid in by_id:
            by_id[sid]["deliveries"].append(dict(kind=kind, sop_instance_uid=sop, state=state, sent=_ts(sent),
                                                 made=_ts(made)))
    return res


def in_pacs(pacs, sop_uids: list[str]) -> set[str]:
    found = set()
    for uid in sop_uids:
        try:
            if pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}):
                found.add(uid)
        except OSError:
            pass
    return found


def finished(r: dict | None) -> bool:
    """Analysed (or skipped or failed) and, where outputs were written, every one sent."""
    if not r or r["job_state"] not in ("done", "failed"):
        return False
    if r["outputs_state"] == "written":
        return bool(r["deliveries"]) and all(d["state"] in ("sent", "dead") for d in r["deliveries"])
    return True


def storescu(port: int, folder: Path, calling: str, j2k: bool = False) -> tuple[int, str]:
    """One association for the folder (``j2k``: JPEG 2000 proposed, as the scout was written)."""
    r = subprocess.run(["storescu", "-aet", calling, "-aec", "CTQA", "+sd", "-nh", *(["-xw"] if j2k else []),
                        "127.0.0.1", str(port), str(folder)], capture_output=True, text=True,
                       env=dict(os.environ, TCP_NODELAY="1"))
    return r.returncode, r.stderr[-300:]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# -- the run ------------------------------------------------------------------------------------------

def run(args, day: list[SeriesPlan], sample: list[SeriesPlan], folders: dict[int, Path], ref_folder: Path,
        ref: SeriesPlan, work: Path) -> dict:
    from node.orthanc import LocalOrthanc

    node_port = free_port()
    pacs = LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", node_port)}, workdir=work / "orthanc").start()
    data = work / "var"
    scanners = "".join(f'[[scanners]]\nname = "CT{i}"\nae_title = "CT{i}"\nhosts = ["127.0.0.1"]\n\n'
                       for i in range(1, 6))
    cfg = write_config(work / "config.toml", data_dir=data, port=node_port, stable_age_s=args.stable_age_s,
                       scanners=scanners, models=args.models,
                       extra=f"workers = {args.workers}\n" + pacs_destination(
                           pacs.dicom_port, ae_title=pacs.ae_title, retry_initial_s=2, retry_max_s=10, poll_s=1))
    node = NodeProcess(cfg, work)
    mon = None
    try:
        node.start()
        db = data / "ctqa.sqlite"
        deadline = time.monotonic() + args.timeout
        mon = Monitor(db, node.proc.pid)
        mon.start()
        time.sleep(3.0)
        # 1. the reference: one thin series alone
        t_ref = time.time()
        rc, err = storescu(node_port, ref_folder, "CT1")
        if rc != 0:
            raise RuntimeError(f"storescu (reference) failed: {err}")
        while time.monotonic() < deadline and not finished(series_results(db).get(ref.series_uid)):
            time.sleep(1.0)
        ref_res = series_results(db).get(ref.series_uid)
        print(f"reference done in {time.time() - t_ref:.0f} s")
        # 2. the sample at its scaled arrival times, one pusher per scanner
        pushes: dict[int, dict] = {}
        first = min(s.arrival_s for s in sample)
        t0 = time.time() + 1.0
        replay_t0_mon = t0 - mon.t0

        def scanner_thread(plans: list[SeriesPlan]) -> None:
            for s in plans:
                due = t0 + (s.arrival_s - first) / args.speed
                time.sleep(max(0.0, due - time.time()))
                start = time.time()
                rc, err = storescu(node_port, folders[s.index], s.scanner, j2k=s.kind == "localizer")
                pushes[s.index] = dict(due=due - t0, start=start - t0, end=time.time() - t0, rc=rc,
                                       err=err if rc else "")

        threads = []
        for sc in sorted({s.scanner for s in sample}):
            th = threading.Thread(target=scanner_thread, args=([s for s in sample if s.scanner == sc],), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        push_s = time.time() - t0
        while time.monotonic() < deadline:
            res = series_results(db)
            if all(finished(res.get(s.series_uid)) for s in sample):
                break
            time.sleep(2.0)
        drained_s = time.time() - t0
        res = series_results(db)
        mon.stop()
        sent_uids = [d["sop_instance_uid"] for r in res.values() for d in r["deliveries"] if d["state"] == "sent"]
        found = in_pacs(pacs, sent_uids)
        node_log = node.log()
        node.stop()
        return dict(ref=ref_res, res=res, pushes=pushes, push_s=push_s, drained_s=drained_s, t0=t0,
                    replay_t0_mon=replay_t0_mon, samples=mon.samples, sent=len(sent_uids), in_pacs=len(found),
                    missing_in_pacs=sorted(set(sent_uids) - found)[:10],
                    tracebacks=node_log.count("Traceback"), errors=[ln for ln in node_log.splitlines()
                                                                   if " ERROR " in ln][:10])
    finally:
        if mon is not None:
            mon.stop()
        if node.proc is not None:
            node.stop(signal.SIGKILL)
        pacs.cleanup()


# -- what it implies --------------------------------------------------------------------------------

def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b * n (b = 0 when the slice counts do not differ)."""
    if not points:
        return 0.0, 0.0
    ns = [p[0] for p in points]
    ts = [p[1] for p in points]
    mn, mt = statistics.fmean(ns), statistics.fmean(ts)
    var = sum((n - mn) ** 2 for n in ns)
    if var == 0:
        return 0.0, mt / mn if mn else 0.0
    b = sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / var
    a = mt - b * mn
    if a < 0:  # not a physical fit (noise): proportional instead
        return 0.0, sum(ts) / sum(ns)
    return a, b


def simulate_day(day: list[SeriesPlan], cost, workers: int, ingest_s_per_instance: float, stable_age_s: float,
                 send_s: float, days: int = 1) -> dict:
    """The day (``days`` times in a row) on one machine: each scanner sends its series in order (a
    send of n instances takes n * ingest_s_per_instance), a series is queued stable_age_s after its
    last instance, ``workers`` FIFO workers take cost(series) s each; outputs need send_s more.
    Figures are those of the last day (its midnight = 0 s), when the backlog of earlier days is
    already there: the steady state when ``days`` > 1."""
    ready = []
    busy_until: dict[str, float] = defaultdict(float)
    for d in range(days):
        for s in day:
            start = max(s.arrival_s + d * DAY_S, busy_until[s.scanner])
            end = start + s.n_slices * ingest_s_per_instance
            busy_until[s.scanner] = end
            ready.append((end + stable_age_s, end, d, s))
    ready.sort(key=lambda r: (r[0], r[2], r[3].index))
    free = [0.0] * workers
    heapq.heapify(free)
    lat, done_at, depth_events = [], [], []
    for q, end, d, s in ready:
        w = heapq.heappop(free)
        start = max(w, q)
        fin = start + cost(s)
        heapq.heappush(free, fin)
        depth_events.append((q, start))
        if d == days - 1:
            done_at.append(fin - d * DAY_S)
            if s.kind in FULL_KINDS:
                lat.append(fin + send_s - end)
    starts = sorted(st for _, st in depth_events)
    queued = sorted(q for q, _ in depth_events)
    max_depth = 0
    for q in queued:  # waiting at time q: queued by q, not yet started
        max_depth = max(max_depth, bisect.bisect_right(queued, q) - bisect.bisect_right(starts, q))
    last = max(done_at)
    return {"days": days, "last_analysed": _hhmm(last), "last_analysed_s": round(last),
            "clears_before_0800_next_day": last <= DAY_S + 8 * 3600,
            "latency_median_s": round(pct(lat, 0.5) or 0), "latency_p95_s": round(pct(lat, 0.95) or 0),
            "max_waiting": max_depth}


def implied(day: list[SeriesPlan], rows: list[dict], per_kind: dict, ref_slices: int, ref_ana: float | None,
            workers: int, stable_age_s: float) -> dict:
    """What the sample's measurements imply for the whole day (see the module's docstring)."""
    pts = [(x["slices"], x["analysis_s"]) for x in rows if x["kind"] in FULL_KINDS and x["analysis_s"] is not None
           and x["models"] and len(x["models"]) > 1]
    if ref_ana is not None:
        pts.append((ref_slices, ref_ana))
    a, b = fit_line(pts)
    cheap = {k: v["analysis_s_mean"] for k, v in per_kind.items() if k not in FULL_KINDS and v["analysis_s_mean"] is not None}
    cheap_default = statistics.fmean(cheap.values()) if cheap else 0.0
    dup_full = any(x["kind"] == "duplicate" and x["models"] and len(x["models"]) > 1 for x in rows)

    def cost(s: SeriesPlan) -> float:
        if s.kind in FULL_KINDS:
            return a + b * s.n_slices
        return cheap.get(s.kind, cheap_default)

    demand = sum(cost(s) for s in day)
    by_kind_demand = defaultdict(float)
    for s in day:
        by_kind_demand[s.kind] += cost(s)
    machines = math.ceil(demand / (workers * DAY_S)) if demand else 0
    # ingest: wall seconds per instance while the sample's series were pushed (one association each)
    total_inst = sum(x["received"] or 0 for x in rows)
    total_push = sum(x["push_s"] or 0 for x in rows)
    ingest_s = total_push / total_inst if total_inst else 0.01
    sends = [x["to_pacs_s"] - x["to_done_s"] for x in rows if x["to_pacs_s"] is not None and x["to_done_s"] is not None]
    send_s = pct(sends, 0.5) or 2.0
    util = demand / (workers * DAY_S)
    sim = simulate_day(day, cost, workers, ingest_s, stable_age_s, send_s, days=3)
    met = util <= 1.0 and sim["clears_before_0800_next_day"]
    sim_m = {}
    m = 1
    while not met and m < 8:
        m += 1  # m machines: the day's scanners split between them
        parts = [[s for s in day if (int(s.scanner[2:]) - 1) % m == i] for i in range(m)]
        sims = [simulate_day(p, cost, workers, ingest_s, stable_age_s, send_s, days=3) for p in parts if p]
        worst = max(sims, key=lambda x: x["last_analysed_s"])
        util_m = max(sum(cost(s) for s in p) for p in parts if p) / (workers * DAY_S)
        sim_m = {"machines": m, "utilisation_max": round(util_m, 2), "last_analysed": worst["last_analysed"],
                 "latency_median_s": max(x["latency_median_s"] for x in sims),
                 "latency_p95_s": max(x["latency_p95_s"] for x in sims),
                 "met": util_m <= 1.0 and all(x["clears_before_0800_next_day"] for x in sims)}
        if sim_m["met"]:
            break
    return {
        "cost_model": {"full_model_a_s": _r(a), "full_model_b_s_per_slice": _r(b, 4), "points": pts,
                       "cheap_kinds_s": cheap, "cheap_default_s": _r(cheap_default),
                       "duplicate_analysed_fully_in_sample": dup_full,
                       "ingest_s_per_instance": round(ingest_s, 4), "send_s": _r(send_s)},
        "ingest_instances_per_s": round(1 / ingest_s, 1) if ingest_s else None,
        "day_demand_s": round(demand), "day_demand_h": round(demand / 3600, 2),
        "day_demand_by_kind_s": {k: round(v) for k, v in by_kind_demand.items()},
        "utilisation": round(util, 3), "machines": machines,
        "machines_formula": f"ceil(S_w / (w * 86400)) = ceil({demand:.0f} / ({workers} * 86400))",
        "simulated_day": sim, "target_met_one_machine": met, "simulated_more_machines": sim_m,
    }


def summarise(args, day, sample, out, ref) -> dict:
    res, pushes = out["res"], out["pushes"]
    per_kind: dict[str, dict] = {}
    rows = []
    for s in sample:
        r = res.get(s.series_uid) or {}
        p = pushes.get(s.index, {})
        ana = (r["finished"] - r["started"]) if r.get("finished") and r.get("started") else None
        sent = [d["sent"] for d in r.get("deliveries", []) if d["state"] == "sent" and d["sent"]]
        made = [d["made"] for d in r.get("deliveries", []) if d.get("made")]
        lat_pacs = (max(sent) - r["last_received"]) if sent and len(sent) == len(r["deliveries"]) else None
        lat_done = (r["finished"] - r["last_received"]) if r.get("finished") and r.get("last_received") else None
        rows.append(dict(index=s.index, kind=s.kind, scanner=s.scanner, slices=s.n_slices, received=r.get("n_instances"),
                         push_rc=p.get("rc"), push_s=round(p["end"] - p["start"], 1) if p else None,
                         wait_to_send_s=round(p["start"] - p["due"], 1) if p else None,
                         job=r.get("job_state"), outcome=r.get("outcome"), models=r.get("models_selected"),
                         analysis_s=round(ana, 1) if ana is not None else None,
                         to_pacs_s=round(lat_pacs, 1) if lat_pacs is not None else None,
                         to_done_s=round(lat_done, 1) if lat_done is not None else None,
                         outputs=len(r.get("deliveries", [])), worker=r.get("worker"), error=r.get("error"),
                         # within the job: the first output recorded (models, trends and that output
                         # built), the outputs' span, and the job's close (results rows) after the last
                         first_output_s=_r(min(made) - r["started"]) if made and r.get("started") else None,
                         outputs_span_s=_r(max(made) - min(made)) if made else None,
                         close_after_outputs_s=_r(r["finished"] - max(made)) if made and r.get("finished") else None,
                         job_start_s=round(r["started"] - out["t0"], 1) if r.get("started") else None,
                         job_end_s=round(r["finished"] - out["t0"], 1) if r.get("finished") else None))
    for k in KINDS:
        ks = [x for x in rows if x["kind"] == k]
        if not ks:
            continue
        ana = [x["analysis_s"] for x in ks if x["analysis_s"] is not None]
        pac = [x["to_pacs_s"] for x in ks if x["to_pacs_s"] is not None]
        don = [x["to_done_s"] for x in ks if x["to_done_s"] is not None]
        per_kind[k] = dict(series=len(ks), slices_mean=round(statistics.fmean(x["slices"] for x in ks)),
                           analysed=len(ana), analysis_s_mean=_r(statistics.fmean(ana)) if ana else None,
                           analysis_s_per_slice=_r(sum(ana) / sum(x["slices"] for x in ks if x["analysis_s"] is not None), 3)
                           if ana else None,
                           with_outputs=len(pac), to_pacs_median_s=_r(pct(pac, 0.5)), to_pacs_p95_s=_r(pct(pac, 0.95)),
                           to_done_median_s=_r(pct(don, 0.5)), to_done_p95_s=_r(pct(don, 0.95)),
                           outcomes=dict(Counter(str(x["outcome"]) for x in ks)),
                           models=sorted({m for x in ks for m in (x["models"] or [])}))
    all_pacs = [x["to_pacs_s"] for x in rows if x["to_pacs_s"] is not None]
    unfinished = [x["index"] for x in rows if not finished(res.get(next(s.series_uid for s in sample if s.index == x["index"])))]
    # the reference
    rr = out["ref"] or {}
    ref_ana = (rr["finished"] - rr["started"]) if rr.get("finished") and rr.get("started") else None
    ref_sent = [d["sent"] for d in rr.get("deliveries", []) if d["sent"]]
    ref_pacs = (max(ref_sent) - rr["last_received"]) if ref_sent and rr.get("last_received") else None
    imp = implied(day, rows, per_kind, ref.n_slices, ref_ana, args.workers, args.stable_age_s)
    # how many jobs ran at once while any ran (1 at workers = 1; up to w): job-seconds / busy seconds
    spans = sorted((x["job_start_s"], x["job_end_s"]) for x in rows if x["job_start_s"] is not None
                   and x["job_end_s"] is not None)
    busy, cur = 0.0, None
    for st, en in spans:
        if cur is None or st > cur[1]:
            if cur is not None:
                busy += cur[1] - cur[0]
            cur = [st, en]
        else:
            cur[1] = max(cur[1], en)
    if cur is not None:
        busy += cur[1] - cur[0]
    concurrency = sum(en - st for st, en in spans) / busy if busy else None
    samples = out["samples"]
    cpu = [s for s in samples if "cpu_s" in s]
    cpu_pct = (100 * (cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) / (cpu[-1]["t"] - cpu[0]["t"])) if len(cpu) > 1 else None
    loads = [s["load1"] for s in samples]
    return {
        "bench": "department", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "day": day_summary(day), "sample_series": len(sample), "sample_exams": len({s.exam for s in sample}),
        "sample_per_kind": dict(Counter(s.kind for s in sample)),
        "sample_load_factor": round(len(sample) * args.speed / len(day), 2),
        "push_window_s": round(out["push_s"], 1), "drained_after_s": round(out["drained_s"], 1),
        "unfinished": unfinished, "series": rows, "per_kind": per_kind,
        "to_pacs_median_s": _r(pct(all_pacs, 0.5)), "to_pacs_p95_s": _r(pct(all_pacs, 0.95)),
        "outputs_sent": out["sent"], "outputs_found_in_pacs": out["in_pacs"], "missing_in_pacs": out["missing_in_pacs"],
        "reference": {"slices": ref.n_slices, "analysis_s": _r(ref_ana), "to_pacs_s": _r(ref_pacs),
                      "outcome": rr.get("outcome"), "outputs": len(rr.get("deliveries", []))},
        "queue": [{k: s.get(k) for k in ("t", "waiting", "running", "receiving", "rss_mb", "load1")} for s in samples],
        "max_waiting": max((s.get("waiting", 0) for s in samples), default=0),
        "node_cpu_percent": _r(cpu_pct), "node_rss_peak_mb": max((s["rss_mb"] for s in samples), default=None),
        "node_rss_median_mb": _r(pct([s["rss_mb"] for s in samples], 0.5)),
        "load_average": [min(loads), max(loads)] if loads else None,
        "jobs_running_at_once": _r(concurrency, 2), **imp,
        "node_tracebacks": out["tracebacks"], "node_errors": out["errors"],
    }


def _r(v, nd: int = 1):
    return None if v is None else round(v, nd)


def report(s: dict) -> None:
    a = s["args"]
    print(f"\nday: {s['day']['series']} series, {s['day']['exams']} exams, {s['day']['instances']} instances on "
          f"{s['day']['scanners']} scanners ({s['day']['share_08_18']:.0%} arriving 08-18); "
          f"per kind {s['day']['series_per_kind']}")
    print(f"sample: {s['sample_series']} series of {s['sample_exams']} exams {s['sample_per_kind']}, speed x{a['speed']:g} "
          f"(load factor N*K/1500 = {s['sample_load_factor']}); workers {a['workers']}; load average "
          f"{s['load_average'][0]:.1f}-{s['load_average'][1]:.1f}")
    end = ("all analysed and in the PACS" if not s["unfinished"]
           else f"stopped waiting (--timeout) with {len(s['unfinished'])} series unfinished {s['unfinished']},")
    print(f"pushed in {s['push_window_s']:.0f} s, {end} {s['drained_after_s']:.0f} s after the first push; outputs sent "
          f"{s['outputs_sent']}, found in Orthanc {s['outputs_found_in_pacs']}")
    print(f"{'kind':10} {'series':>6} {'slices':>6} {'analysis s':>10} {'s/slice':>7} {'to PACS med':>11} {'p95':>6} "
          f"{'to done med':>11}  outcomes")
    for k, v in s["per_kind"].items():
        print(f"{k:10} {v['series']:6d} {v['slices_mean']:6d} {_f(v['analysis_s_mean']):>10} "
              f"{_f(v['analysis_s_per_slice'], 3):>7} {_f(v['to_pacs_median_s']):>11} {_f(v['to_pacs_p95_s']):>6} "
              f"{_f(v['to_done_median_s']):>11}  {v['outcomes']} {','.join(v['models'])}")
    for x in s["series"]:
        if x["kind"] in FULL_KINDS and x.get("first_output_s") is not None:
            print(f"  {x['kind']} {x['slices']} slices: job {x['analysis_s']} s = until its outputs were recorded (load, "
                  f"models, trends, outputs built) {x['first_output_s']} s + between the first and last output recorded "
                  f"{x['outputs_span_s']} s + the job's close {x['close_after_outputs_s']} s")
    r = s["reference"]
    print(f"last instance -> results in PACS, every analysed series: median {_f(s['to_pacs_median_s'])} s, p95 "
          f"{_f(s['to_pacs_p95_s'])} s; reference (one {r['slices']}-slice thin series alone): {_f(r['to_pacs_s'])} s "
          f"(analysis {_f(r['analysis_s'])} s)" + (f"; ratio median/reference {s['to_pacs_median_s'] / r['to_pacs_s']:.2f}"
                                                 if s["to_pacs_median_s"] and r["to_pacs_s"] else ""))
    thin = s["per_kind"].get("thin", {})
    if thin.get("analysis_s_per_slice") and r["analysis_s"]:
        print(f"thin series analysis {thin['analysis_s_per_slice']:.3f} s/slice in the sample vs "
              f"{r['analysis_s'] / r['slices']:.3f} alone: ratio {thin['analysis_s_per_slice'] / (r['analysis_s'] / r['slices']):.2f}")
    print(f"queue: at most {s['max_waiting']} jobs waiting; node CPU {_f(s['node_cpu_percent'])} % of one core "
          f"(its processes), RSS median {_f(s['node_rss_median_mb'])} MB, peak {s['node_rss_peak_mb']} MB; ingest "
          f"{s['ingest_instances_per_s']} instances/s per association")
    depth = " ".join(f"{q['t']:.0f}s:{q.get('waiting', '?')}+{q.get('running', '?')}" for q in s["queue"][::max(1, len(s['queue']) // 20)])
    print(f"queue over time (t: waiting+running): {depth}")
    c = s["cost_model"]
    print(f"cost model at workers={a['workers']}: full-model series {c['full_model_a_s']} + {c['full_model_b_s_per_slice']} "
          f"s/slice ({len(c['points'])} jobs); other kinds {c['cheap_kinds_s']} s")
    print(f"jobs running at once while any ran: {_f(s['jobs_running_at_once'], 2)} (of {a['workers']} workers)")
    print(f"the day needs S_{a['workers']} = {s['day_demand_s']} worker-s ({s['day_demand_h']} h; by kind "
          f"{s['day_demand_by_kind_s']}) -> machines = {s['machines_formula']} = {s['machines']}")
    print(f"utilisation of one machine S_w / (w * 86400) = {s['utilisation']:.2f}")
    sim = s["simulated_day"]
    print(f"the day simulated on one machine, {a['workers']} worker(s), steady state (3rd day in a row): its last series "
          f"analysed {sim['last_analysed']} ({'before' if sim['clears_before_0800_next_day'] else 'NOT before'} 08:00 the "
          f"next day), at most {sim['max_waiting']} waiting, last instance -> PACS median {sim['latency_median_s']} s, "
          f"p95 {sim['latency_p95_s']} s; target (utilisation <= 1 and the day's series analysed before the next "
          f"working day) {'MET' if s['target_met_one_machine'] else 'NOT met'} on one machine"
          + (f"; {s['simulated_more_machines']}" if s["simulated_more_machines"] else ""))
    if s["node_tracebacks"] or s["node_errors"]:
        print(f"node log: {s['node_tracebacks']} tracebacks, errors: {s['node_errors']}")


def _f(v, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def per_model(args, gen: Path) -> int:
    """Where a full-model series' seconds go: `qa-node analyze` on the reference thin series with
    basic alone, then basic plus each other model (each run loads the series again), one after
    the other on this machine, nothing else of ours running."""
    ref, ref_exam = reference_plan(args.seed, args.ref_slices)
    folder = generate([ref], ref_exam, gen / "reference", f"ref-{args.seed}-{args.ref_slices}")[ref.index]
    work = Path(tempfile.mkdtemp(prefix="ctqa-dept-models-"))
    cfg = write_config(work / "config.toml", data_dir=work / "var", models=args.models)
    out = {"slices": ref.n_slices, "load_average_before": os.getloadavg()[0], "runs": {}}
    try:
        for models in ("basic", "basic,classical", "basic,n2q", "basic,d2iqa"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "node", "--config", str(cfg), "analyze", str(folder), "--json",
                                "--models", models, "--device", "cpu"], capture_output=True, text=True, cwd=work)
            dt = time.perf_counter() - t0
            status = json.loads(r.stdout)[0]["status"] if r.returncode == 0 else f"rc {r.returncode}"
            out["runs"][models] = {"s": round(dt, 1), "status": status, "load1": os.getloadavg()[0]}
            print(f"qa-node analyze --models {models}: {dt:.1f} s ({status}; load {os.getloadavg()[0]:.1f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = out["runs"]["basic"]["s"]
    for m, v in out["runs"].items():
        if m != "basic":
            v["over_basic_s"] = round(v["s"] - base, 1)
    print(f"{ref.n_slices}-slice thin series: load + basic {base:.1f} s (interpreter start included); over it: "
          + ", ".join(f"{m.split(',')[1]} +{v['over_basic_s']:.1f} s" for m, v in out["runs"].items() if m != "basic"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"written {args.json}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--series", type=int, default=1500, help="series in the day")
    ap.add_argument("--schedule", action="store_true", help="print the day's mix and exit")
    ap.add_argument("--sample", type=int, default=14, help="replay whole exams until this many series")
    ap.add_argument("--sample-seed", type=int, default=0, help="which exams are drawn")
    ap.add_argument("--speed", type=float, default=60.0, help="the day's clock runs K times faster")
    ap.add_argument("--workers", type=int, default=1, help="analysis.workers")
    ap.add_argument("--models", default=MODELS, help="analysis.models as TOML (default: the shipped config's)")
    ap.add_argument("--ref-slices", type=int, default=450, help="slices of the reference thin series")
    ap.add_argument("--stable-age-s", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=570.0, help="stop waiting after this many seconds")
    ap.add_argument("--gen-dir", type=Path, help="where the series are generated (kept and reused)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--per-model", action="store_true", help="time qa-node analyze on the reference series "
                    "with basic, then basic + each other model, and exit")
    ap.add_argument("--from-json", type=Path, help="recompute what a saved run implies (cost model, the day, "
                    "machines) from its measured series, print it and write it back (or to --json)")
    args = ap.parse_args()

    day = make_day(args.seed, args.series)
    if args.schedule:
        print(json.dumps(day_summary(day), indent=1))
        return 0
    if args.from_json:
        s = json.loads(args.from_json.read_text())
        a = s["args"]
        day = make_day(a["seed"], a["series"])
        ref = s["reference"]
        s.update(implied(day, s["series"], s["per_kind"], ref["slices"], ref["analysis_s"], a["workers"],
                         a["stable_age_s"]))
        report(s)
        dest = args.json or args.from_json
        dest.write_text(json.dumps(s, indent=1, default=str) + "\n")
        print(f"written {dest}")
        return 0
    for p in (PHANTOM_1MM, PHANTOM_5MM, LOCALIZER):
        if not p.exists():
            print(f"shared data {p} is absent", file=sys.stderr)
            return 2
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (apt-get install dcmtk orthanc)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.per_model:
        return per_model(args, args.gen_dir or Path(tempfile.mkdtemp(prefix="ctqa-dept-gen-")))
    sample = sample_exams(day, args.sample, args.sample_seed)
    gen = args.gen_dir or Path(tempfile.mkdtemp(prefix="ctqa-dept-gen-"))
    ref, ref_exam = reference_plan(args.seed, args.ref_slices)
    folders = generate(sample, day, gen / "sample", f"{args.seed}-{args.series}-{args.sample}-{args.sample_seed}")
    ref_folder = generate([ref], ref_exam, gen / "reference", f"ref-{args.seed}-{args.ref_slices}")[ref.index]
    work = Path(tempfile.mkdtemp(prefix="ctqa-dept-"))
    print(f"load average before: {os.getloadavg()[0]:.1f}; sample {len(sample)} series "
          f"{dict(Counter(s.kind for s in sample))}, {sum(s.n_slices for s in sample)} instances")
    try:
        out = run(args, day, sample, folders, ref_folder, ref, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.gen_dir is None:
            shutil.rmtree(gen, ignore_errors=True)
    s = summarise(args, day, sample, out, ref)
    report(s)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(s, indent=1, default=str) + "\n")
        print(f"written {args.json}")
    ok = (not s["unfinished"] and s["outputs_found_in_pacs"] == s["outputs_sent"]
          and all(r["received"] == r["slices"] for r in s["series"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
