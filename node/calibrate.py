"""``qa-node calibrate``: each score the node produces, checked against the site's ratings and mapped
to the site's Likert scale (0-4); the calibrations in the database; ``<metric>_likert`` on analyses.

For every calibratable metric (``CALIBRATABLE``: a series metric whose model also gives it per slice)
the rated images of a ratings file (``node.ratings``) are scored as ``qa-node analyze --per-slice``
scores them: each rated file is loaded (``analysis.volume.load_series``) and the metric's model run
on it (``analysis.pipeline.run_model``, the configured ``[analysis.<model>]`` options); the value is
the model's per-slice value of the rated slice (frame). Several ratings of one image (raters) are
averaged first. ``analysis.calibration`` then gives the raw and cross-validated PLCC / SROCC / KROCC
and the LDCTIQAC aggregate with series-bootstrap 95 % CIs, and the monotone map (isotonic or
5-parameter logistic, by cross-validated error). Each calibrated metric becomes one row of the table
``calibrations``, with the model's algorithm version and weights SHA-256 it was fitted on; the
newest row of a metric is the one in use, and only for scores of that same version and weights (an
analysis by other weights gets a null ``<metric>_likert`` saying so: calibrate again).

From then on every analysis (the worker, ``qa-node analyze``, ``rebuild-outputs`` of a new
analysis) carries ``<metric>_likert`` = the map applied to the **series value** of the metric (the
value the SR reports: the median of the slices' global noise, the mean of the scored slices' learned
scores), in an output of its own (algorithm "CTQA site Likert calibration") whose TID 4019
parameters name the calibration (id, date, method, images, series). The map was fitted on single
slices: the series value is the Likert a rater would give a typical slice of the series.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from analysis import models as registry

log = logging.getLogger(__name__)

LIKERT_SUFFIX = "_likert"
ALGORITHM = "CTQA site Likert calibration"
VERSION = "1.0"
OUTPUT_NAME = "calibration"  # the ModelOutput (and analysis run) that holds the <metric>_likert values

# metric -> private code value of its <metric>_likert (never reused; docs/outputs.md lists them)
CALIBRATABLE: Mapping[str, str] = OrderedDict((
    ("global_noise_hu", "GLOBAL_NOISE_LK"),
    ("n2q_mean_quality", "N2Q_MEAN_LK"),
    ("d2iqa_score", "D2IQA_LK"),
    ("ldctiqa_score", "LDCTIQA_LK"),
    ("ldctiqa_expected_score", "LDCTIQA_EXP_LK"),
    ("delta_iqa_score", "DELTA_IQA_LK"),
))


def likert_key(metric: str) -> str:
    return metric + LIKERT_SUFFIX


def _metric_specs() -> dict[str, tuple]:
    return {m.key: (s, m) for s, m in registry.metrics()}


def likert_metric_codes() -> list:
    """The catalogue entries (``reports.codes.MetricCode``) of every ``<metric>_likert``."""
    from reports import codes

    specs = _metric_specs()
    out = []
    for metric, value in CALIBRATABLE.items():
        if metric not in specs:
            continue
        _, m = specs[metric]
        out.append(codes.MetricCode(
            likert_key(metric), codes.private(value, f"{m.concept.meaning}, site Likert calibration"[:64]),
            codes.NO_UNITS, "", f"{m.label} on the site Likert scale (0-4)",
            meaning=f"{m.label} mapped by the site's calibration to the raters' Likert scale "
                    "(0 bad - 4 excellent); higher is better"))
    return out


# ------------------------------------------------------------------------------------------ in use
@dataclass(frozen=True)
class InUse:
    """The calibration of one metric that analyses apply (the newest row of the metric)."""

    id: int
    metric: str
    created_at: datetime
    method: str
    map: object  # analysis.calibration.LikertMap
    n_images: int
    n_series: int
    statistics: dict
    model_version: str | None = None  # "<algorithm> <version>" of the model that gave the scores
    weights_sha256: str | None = None

    @property
    def note(self) -> str:
        return (f"calibration {self.id} of {self.created_at:%Y-%m-%d %H:%M} UTC, {self.method}, fitted on "
                f"{self.n_images} rated images of {self.n_series} series; applied to the series value")


def current_calibrations(db) -> dict[str, InUse]:
    """metric -> its calibration in use; empty when there is none (or no table yet: an old database)."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from analysis.calibration import LikertMap
    from storage.models import Calibration

    try:
        with db.session() as s:
            newest = select(func.max(Calibration.id)).group_by(Calibration.metric)
            rows = s.scalars(select(Calibration).where(Calibration.id.in_(newest))).all()
    except SQLAlchemyError:
        return {}
    out = {}
    for r in rows:
        try:
            out[r.metric] = InUse(r.id, r.metric, r.created_at, r.method, LikertMap.from_dict(json.loads(r.parameters)),
                                  r.n_images, r.n_series, json.loads(r.statistics), r.model_version, r.weights_sha256)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("calibration %d of %s is unreadable (%s): not applied", r.id, r.metric, exc)
    return out


def model_identity(out) -> str:
    """``"<algorithm> <version>"`` of a model output (what a calibration is tied to, with the weights)."""
    return f"{out.algorithm} {out.version}"[:200]


def mismatch(cal: InUse, out) -> str | None:
    """Why calibration ``cal`` does not apply to the scores of model output ``out`` (another model
    version or other weights than it was fitted on), or None."""
    if cal.model_version and model_identity(out) != cal.model_version:
        return (f"calibration {cal.id} was fitted on {cal.model_version}, this analysis ran "
                f"{model_identity(out)}: run qa-node calibrate again")
    if (cal.weights_sha256 or None) != (out.weights_sha256 or None):
        short = lambda h: h[:12] if h else "none"  # noqa: E731
        return (f"calibration {cal.id} was fitted with weights {short(cal.weights_sha256)}, this analysis used "
                f"{short(out.weights_sha256)}: run qa-node calibrate again")
    return None


def apply_calibrations(result, calibrations: Mapping[str, InUse]) -> None:
    """Add ``<metric>_likert`` for each calibrated metric the result holds (an output of its own,
    ``OUTPUT_NAME``). A metric that was not measured, or was measured by another model version or
    other weights than the calibration was fitted on, gets a null Likert with the reason."""
    if not calibrations or result.status == "failed" or not result.outputs:
        return
    from analysis.results import ModelOutput

    metrics, reasons = result.metrics, result.reasons
    source = {k: o for o in result.outputs for k in o.series_metrics}
    out = ModelOutput(name=OUTPUT_NAME, algorithm=ALGORITHM, version=VERSION)
    for metric, cal in calibrations.items():
        if metric not in metrics or source[metric].name == OUTPUT_NAME:
            continue
        key = likert_key(metric)
        value = metrics[metric]
        other = mismatch(cal, source[metric])
        if other:
            out.set_metric(key, None, other)
        elif value is None:
            out.set_metric(key, None, f"{metric} not measured: {reasons.get(metric, 'no value')}")
        else:
            out.set_metric(key, cal.map.apply_one(float(value)))
        out.parameters.append(f"{key}={cal.note}")
        out.info[f"{key}_calibration"] = cal.note
    if out.series_metrics:
        result.outputs.append(out)


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class RatedImage:
    path: Path
    frame: int | None
    series: str | None
    rating: float  # mean over its ratings
    n_ratings: int


def rated_images(rows) -> list[RatedImage]:
    """One entry per (file, frame), its ratings averaged, in file order."""
    acc: dict[tuple[str, int | None], list] = OrderedDict()
    for r in rows:
        key = (str(r.path), r.frame)
        if key not in acc:
            acc[key] = [r.path, r.frame, r.series_instance_uid, []]
        acc[key][3].append(float(r.score))
    return [RatedImage(p, f, s, sum(v) / len(v), len(v)) for p, f, s, v in acc.values()]


def score_images(images: Sequence[RatedImage], metrics: Sequence[str], ctx,
                 progress: bool = False) -> tuple[dict[str, list[float]], dict[str, str], dict[str, tuple]]:
    """Per-image values of ``metrics`` (nan where the model gave none); per metric, why it has no
    value when it has none anywhere (the model's own reason: weights not installed, ...); and per
    metric the (``"<algorithm> <version>"``, weights SHA-256) of the model that gave the values."""
    from analysis.pipeline import resolve_model, run_model
    from analysis.results import SeriesSkipped
    from analysis.volume import load_series

    specs = _metric_specs()
    models = list(OrderedDict.fromkeys(specs[m][0].name for m in metrics))
    values = {m: [math.nan] * len(images) for m in metrics}
    identity: dict[str, tuple[str, str | None]] = {}  # model -> (algorithm version, weights SHA-256)
    why: dict[str, dict[str, int]] = {m: {} for m in metrics}
    unavailable: dict[str, str] = {}
    for name in models:
        try:
            spec = resolve_model(name)
        except ValueError as exc:
            unavailable[name] = str(exc)
            continue
        # a model that cannot work as configured (weights not installed) is not run on every rated file
        why_not = spec.startup_check(ctx.options_for(name)) if spec.startup_check is not None else None
        if why_not:
            unavailable[name] = why_not
    by_file: dict[str, list[int]] = OrderedDict()
    for i, im in enumerate(images):
        by_file.setdefault(str(im.path), []).append(i)
    it = by_file.items()
    if progress:
        from tqdm import tqdm

        it = tqdm(list(it), desc="scoring rated images", unit="file", dynamic_ncols=True, file=sys.stderr)
    for path, idx in it:
        try:
            vol = load_series([path])
        except (SeriesSkipped, ValueError, OSError) as exc:
            reason = f"a rated file could not be analysed ({exc})"
            for m in metrics:
                why[m][reason] = why[m].get(reason, 0) + len(idx)
            continue
        for name in models:
            if name in unavailable:
                continue
            try:
                out = run_model(name, vol, ctx)
                identity.setdefault(name, (model_identity(out), out.weights_sha256))
            except (SeriesSkipped, ValueError, RuntimeError, FloatingPointError) as exc:
                out = None
                reason = f"{name}: {exc}"
            for m in metrics:
                if specs[m][0].name != name:
                    continue
                if out is None:
                    why[m][reason] = why[m].get(reason, 0) + len(idx)
                    continue
                arr = out.slice_metrics.get(m)
                for i in idx:
                    k = 0 if images[i].frame is None else vol.frame_numbers.index(images[i].frame)
                    v = float(arr[k]) if arr is not None and k < len(arr) else math.nan
                    values[m][i] = v
                    if not math.isfinite(v):
                        r = out.reasons.get(m) or "no per-slice value on the rated slice"
                        why[m][r] = why[m].get(r, 0) + 1
    reasons = {}
    for m in metrics:
        model = specs[m][0].name
        if model in unavailable:
            reasons[m] = unavailable[model]
        elif why[m] and not any(math.isfinite(v) for v in values[m]):
            reasons[m] = max(why[m], key=why[m].get)
    return values, reasons, {m: identity.get(specs[m][0].name, (None, None)) for m in metrics}


# ------------------------------------------------------------------------------------------ command
# analysis.calibration's defaults, repeated here so that building the parser (every qa-node command)
# does not import scipy.stats (~1.3 s CPU); tests/unit/test_calibration.py asserts they are equal
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--ratings", required=True, metavar="FILE",
                    help="ratings CSV (path,score[,rater,frame,sop_instance_uid]; see `qa-node ratings`)")
    sp.add_argument("--metrics", nargs="+", metavar="METRIC",
                    help=f"metrics to calibrate (default: all of {', '.join(CALIBRATABLE)}); commas or spaces")
    sp.add_argument("--json", action="store_true", help="print the calibrations as JSON")
    sp.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                    help=f"cross-validation folds, split by series (default {DEFAULT_FOLDS})")
    sp.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N",
                    help=f"bootstrap resamples of series for the 95%% CIs (default {DEFAULT_BOOTSTRAP})")
    sp.add_argument("--seed", type=int, default=0, help="seed of the folds and the bootstrap (default 0)")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override [analysis] device")
    sp.add_argument("--dry-run", action="store_true", help="compute and print, store nothing")


def parse_metrics(values: Sequence[str] | None) -> list[str]:
    """``--metrics`` -> the metric keys; ValueError naming the calibratable metrics otherwise."""
    if not values:
        return list(CALIBRATABLE)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in CALIBRATABLE]
    if bad:
        raise ValueError(f"cannot calibrate {', '.join(repr(b) for b in bad)}: calibratable metrics are "
                         f"{', '.join(CALIBRATABLE)}")
    return list(OrderedDict.fromkeys(names))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibrate_metrics(images: Sequence[RatedImage], values: Mapping[str, Sequence[float]],
                      reasons: Mapping[str, str], identity: Mapping[str, tuple] | None = None, *,
                      folds: int, n_boot: int, seed: int) -> list[dict]:
    """One entry per metric: ``{"metric", "available": False, "reason"}`` or the calibration."""
    from analysis.calibration import CalibrationError, calibrate

    ratings = [im.rating for im in images]
    groups = [im.series for im in images]
    out = []
    for metric, vals in values.items():
        if metric in reasons:
            out.append({"metric": metric, "available": False, "reason": reasons[metric]})
            continue
        try:
            c = calibrate(vals, ratings, groups, folds=folds, n_boot=n_boot, seed=seed)
        except CalibrationError as exc:
            out.append({"metric": metric, "available": False, "reason": str(exc)})
            continue
        version, sha = (identity or {}).get(metric, (None, None))
        out.append({"metric": metric, "available": True, "method": c.method, "map": c.map.to_dict(),
                    "n_images": c.n_pairs, "n_series": c.n_groups, "model_version": version, "weights_sha256": sha,
                    "statistics": c.statistics(), "_cal": c})
    return out


def store(db, entries: Sequence[dict], *, ratings_file: Path, sha: str, n_ratings: int) -> None:
    """Every available entry as a row of ``calibrations`` (one transaction); sets ``id``/``created_at``."""
    from storage.models import Calibration

    with db.session() as s:
        rows = []
        for e in entries:
            if not e["available"]:
                continue
            row = Calibration(metric=e["metric"], method=e["method"], parameters=json.dumps(e["map"]),
                              n_ratings=n_ratings, n_images=e["n_images"], n_series=e["n_series"],
                              ratings_file=str(ratings_file)[:1024], ratings_sha256=sha,
                              statistics=json.dumps(e["statistics"]), model_version=e.get("model_version"),
                              weights_sha256=e.get("weights_sha256"))
            s.add(row)
            rows.append((e, row))
        s.commit()
        for e, row in rows:
            e["id"] = row.id
            e["created_at"] = row.created_at.isoformat()


def _ci(block: dict, k: str) -> str:
    v, (lo, hi) = block[k]["value"], block[k]["ci95"]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def print_table(entries: Sequence[dict], out=sys.stdout) -> None:
    out.write(f"{'metric':<24} {'id':>4} {'method':<9} {'images':>6} {'series':>6}  "
              f"{'SROCC (raw) [95% CI]':<26} {'aggregate (CV) [95% CI]':<26} {'PLCC (CV)':<26} CV RMSE\n")
    for e in entries:
        if not e["available"]:
            out.write(f"{e['metric']:<24} not available: {e['reason']}\n")
            continue
        st = e["statistics"]
        rmse = st["cv_rmse"][e["method"]]
        out.write(f"{e['metric']:<24} {str(e.get('id', '-')):>4} {e['method']:<9} {e['n_images']:>6} {e['n_series']:>6}  "
                  f"{_ci(st['raw'], 'srocc'):<26} {_ci(st['cross_validated'], 'aggregate'):<26} "
                  f"{_ci(st['cross_validated'], 'plcc'):<26} {'-' if rmse is None else f'{rmse:.3f}'}\n")


def run(args, settings, db_factory) -> int:
    """The command; ``db_factory()`` opens (and makes, if needed) the node's database. Exit 0 when at
    least one metric was calibrated, 1 when none could be, 2 for a bad ratings file or metric."""
    from node.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
    from node.ratings import RatingsFileError, print_problems, read_ratings_csv
    from node.worker import run_context

    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.folds < 2:
        raise UsageError("--folds must be >= 2")
    if args.bootstrap < 100:
        raise UsageError("--bootstrap must be >= 100 resamples")
    path = Path(args.ratings)
    try:
        rows = read_ratings_csv(path)
    except RatingsFileError as exc:
        print_problems(exc.path, exc.errors, "nothing calibrated", prefix="qa-node: ")
        return EXIT_USAGE
    try:
        ctx = run_context(settings, args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    images = rated_images(rows)
    log.info("%d rating(s) of %d image(s) in %d series", len(rows), len(images),
             len({im.series for im in images}))
    values, reasons, identity = score_images(images, metrics, ctx, progress=sys.stderr.isatty())
    entries = calibrate_metrics(images, values, reasons, identity, folds=args.folds, n_boot=args.bootstrap,
                                seed=args.seed)
    if any(e["available"] for e in entries) and not args.dry_run:
        db = db_factory()
        try:
            store(db, entries, ratings_file=path.resolve(), sha=sha256_of(path), n_ratings=len(rows))
        finally:
            db.dispose()
    for e in entries:
        e.pop("_cal", None)
    if args.json:
        json.dump({"ratings_file": str(path.resolve()), "n_ratings": len(rows), "n_images": len(images),
                   "stored": not args.dry_run, "calibrations": entries}, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print_table(entries)
        if args.dry_run:
            print("(dry run: nothing stored)")
    if not any(e["available"] for e in entries):
        print("qa-node: no metric could be calibrated on these ratings; nothing stored", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
