"""The ratings file: the CSV a site's raters' scores travel in (reading it, checked row by row, and
writing it). Pure file handling, no database: the trainers (``qa-node train delta_iqa|ldctiqa``)
read it from here, and ``node.ratings`` (import into / export from the node's database) re-exports it.

Format (UTF-8, comma-separated, one header line)::

    path,score[,rater][,frame][,sop_instance_uid]

- ``path``: a DICOM file, absolute or relative to the CSV's folder;
- ``score``: the Likert score in [0, 4] (LDCTIQA / Delta-IQA scale); fractions are allowed (a mean
  over raters);
- ``rater`` (optional): who scored; empty = not named (e.g. a mean);
- ``frame`` (optional): 1-based frame of a multi-frame image (required there, empty otherwise);
- ``sop_instance_uid`` (optional): checked against the file when given.

Columns other than these are ignored. Every bad row is reported with its line number (all of them
at once, in ``RatingsFileError.errors``); nothing is imported from a file with a bad row.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# DICOM PS3.5 9.1 (the same rule as storage.filestore.is_valid_uid; analysis imports nothing of storage,
# tests/unit/test_ldctiqa_train.py checks that the two agree)
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(uid: object) -> bool:
    """DICOM PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


SCORE_MIN = 0.0
SCORE_MAX = 4.0
COLUMNS = ("path", "score", "rater", "frame", "sop_instance_uid")
REQUIRED = ("path", "score")
# the verbal scale of the LDCTIQAC 2023 challenge (Lee et al., Table 1), which Delta-IQA was trained on:
# (score, verbal description, diagnostic quality criterion), shown beside the keys 0-4 on the rating page
LIKERT = (
    (0, "Bad", "Desired features are not shown"),
    (1, "Poor", "Diagnostic interpretation is impossible"),
    (2, "Fair", "Images are suitable for limited clinical interpretation"),
    (3, "Good", "Images are suitable for diagnostic interpretation"),
    (4, "Excellent", "The anatomical structure is evident"),
)


class RatingsFileError(ValueError):
    """A ratings file that cannot be used: ``errors`` holds one line per problem ("line N: ...")."""

    def __init__(self, path: Path | str, errors: Sequence[str]) -> None:
        self.path = str(path)
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"{self.path}: {n} bad row{'s' if n != 1 else ''}: " + "; ".join(self.errors[:5])
                         + (f"; ... ({n - 5} more)" if n > 5 else ""))


def print_problems(source: Path | str, errors: Sequence[str], outcome: str, prefix: str = "") -> None:
    """Every problem of a ratings file (or of its rated images) on stderr, one per line under a head
    line, for the commands that refuse the whole file: ``<prefix><source>: N problem(s); <outcome>:``."""
    print(f"{prefix}{source}: {len(errors)} problem(s); {outcome}:", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)


@dataclass(frozen=True)
class RatingRow:
    line: int  # line in the CSV (header = line 1); 0 when not from a file
    path: Path  # absolute
    score: float
    rater: str | None = None
    frame: int | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None  # read from the file when it was checked


def parse_score(text: str) -> float:
    """A Likert score in [0, 4]; ValueError with the reason otherwise."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"score {text!r} is not a number") from None
    if not math.isfinite(v) or not SCORE_MIN <= v <= SCORE_MAX:
        raise ValueError(f"score {text!r} is outside [0, 4]")
    return v


def _frames_and_uids(path: Path) -> tuple[int, str | None, str | None]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "PixelData" not in ds and "Rows" not in ds:
        raise ValueError("has no image")
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    sop = str(ds.get("SOPInstanceUID", "") or "") or None
    series = str(ds.get("SeriesInstanceUID", "") or "") or None
    return max(n, 1), sop, series


def read_ratings_csv(csv_path: str | Path, *, check_files: bool = True) -> list[RatingRow]:
    """Read and check a ratings CSV. With ``check_files`` each path must be a readable DICOM image,
    ``frame`` must exist in it and ``sop_instance_uid`` must match. Raises ``RatingsFileError`` listing
    every bad row (and a missing column or an empty file); returns the rows otherwise."""
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent
    try:
        fh = csv_path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise RatingsFileError(csv_path, [f"cannot open: {exc.strerror or exc}"]) from None
    errors: list[str] = []
    rows: list[RatingRow] = []
    cache: dict[Path, tuple[int, str | None, str | None] | str] = {}
    with fh:
        reader = csv.DictReader(fh)
        try:
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
        except csv.Error as exc:
            raise RatingsFileError(csv_path, [f"line 1: {exc}"]) from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise RatingsFileError(csv_path, [f"line 1: missing column(s) {', '.join(missing)} "
                                              f"(header must name at least path,score)"])
        reader.fieldnames = header
        try:
            for rec in reader:
                line = reader.line_num
                problems: list[str] = []
                if None in rec:  # more fields than the header
                    problems.append(f"{len(rec[None])} field(s) more than the header")
                get = lambda k: (rec.get(k) or "").strip()  # noqa: E731
                raw_path = get("path")
                path: Path | None = None
                if not raw_path:
                    problems.append("path is empty")
                else:
                    p = Path(raw_path).expanduser()
                    path = p if p.is_absolute() else base / p
                score = None
                try:
                    score = parse_score(get("score"))
                except ValueError as exc:
                    problems.append(str(exc))
                frame = None
                if get("frame"):
                    try:
                        frame = int(get("frame"))
                        if frame < 1:
                            raise ValueError
                    except ValueError:
                        problems.append(f"frame {get('frame')!r} is not a frame number (1, 2, ...)")
                        frame = None
                sop = get("sop_instance_uid") or None
                if sop is not None and not is_valid_uid(sop):
                    problems.append(f"sop_instance_uid {sop!r} is not a valid UID")
                    sop = None
                series = None
                if path is not None and check_files:
                    info = cache.get(path)
                    if info is None:
                        if not path.is_file():
                            info = f"no such file {raw_path!r}"
                        else:
                            try:
                                info = _frames_and_uids(path)
                            except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
                                info = f"{raw_path!r} is not a readable DICOM image ({type(exc).__name__}: {exc})"
                        cache[path] = info
                    if isinstance(info, str):
                        problems.append(info)
                    else:
                        n_frames, file_sop, series = info
                        if frame is not None and frame > n_frames:
                            problems.append(f"frame {frame} but the file has {n_frames} frame(s)")
                        if frame is None and n_frames > 1:
                            problems.append(f"the file has {n_frames} frames: say which in the frame column")
                        if sop is not None and file_sop is not None and sop != file_sop:
                            problems.append("sop_instance_uid does not match the file's SOP Instance UID")
                        sop = sop or file_sop
                if problems:
                    errors.append(f"line {line}: " + "; ".join(problems))
                    continue
                rows.append(RatingRow(line=line, path=path.resolve(), score=float(score), rater=get("rater") or None,
                                      frame=frame, sop_instance_uid=sop, series_instance_uid=series))
        except csv.Error as exc:
            errors.append(f"line {reader.line_num}: {exc}")
    if errors:
        raise RatingsFileError(csv_path, errors)
    if not rows:
        raise RatingsFileError(csv_path, ["no ratings (only a header)"])
    return rows


def write_ratings_csv(out: str | Path, rows: Iterable[RatingRow]) -> int:
    """Write rows as a ratings CSV (absolute paths). Returns the number of rows."""
    out = Path(out)
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([str(r.path), _fmt(r.score), r.rater or "", r.frame or "", r.sop_instance_uid or ""])
            n += 1
    tmp.replace(out)
    return n


def _fmt(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else repr(float(score))
