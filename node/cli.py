"""The ``qa-node`` and ``qa-report`` command lines.

Configuration problems and bad input end with a one-line message on stderr and exit code 2; a
traceback means a bug in the node.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from node.config import ConfigError, Settings, load_settings, resolve_config_path, settings_from_dict

log = logging.getLogger("node")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit 2."""


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    quiet_pydicom_reads()


def quiet_pydicom_reads() -> None:
    """pydicom checks every value it reads and warns per element, per file, twice (a log line and a
    UserWarning): one over-long attribute in a 300-slice series gives hundreds of lines. The node
    checks what it copies into an output itself and says it once per attribute, without the value
    (``reports.common.prepare_sources``), so pydicom's read-time checks are off in its processes."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def _load(args) -> Settings:
    return load_settings(getattr(args, "config", None))


def _load_optional(args) -> Settings:
    """For offline commands: the config if there is one, else the defaults."""
    explicit = getattr(args, "config", None) or os.environ.get("CTQA_CONFIG")
    path = resolve_config_path(getattr(args, "config", None))
    if not explicit and not path.exists():
        return settings_from_dict({"node": {}}, "<defaults>")
    return load_settings(getattr(args, "config", None))


class NoDatabase(Exception):
    """The node's database does not exist (yet) or cannot be opened: one line, exit 1."""


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for in-memory or other backends)."""
    if not url.startswith("sqlite:"):
        return None
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def ensure_database_folder(url: str) -> None:
    """``serve`` creates the folder of a SQLite database (the file itself comes with the tables)."""
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def open_existing_database(url: str):
    """The node's database for a command that reads what ``serve`` recorded. A database that is not
    there yet (or has no node tables) raises NoDatabase with one clear line; it is never created here."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import Database

    path = _sqlite_path(url)
    shown = str(path) if path is not None else url.split("@")[-1]  # never print a password
    if path is not None and not path.is_file():
        raise NoDatabase(f"no database at {path}: start `qa-node serve` first")
    db = Database(url)
    try:
        if "jobs" not in inspect(db.engine).get_table_names():
            db.dispose()
            raise NoDatabase(f"no node tables in the database at {shown}: start `qa-node serve` first")
        db.create_all()  # adds columns a newer version needs (see storage.models.upgrade_schema)
    except SQLAlchemyError as exc:
        db.dispose()
        reason = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
        raise NoDatabase(f"cannot open the database at {shown}: {reason}") from None
    return db


# -- analyze ---------------------------------------------------------------------------------------
def _collect_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def group_by_series(files: Sequence[Path]) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """Read headers only; group files by SeriesInstanceUID. Unreadable files are returned apart."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = defaultdict(list)
    bad: list[tuple[Path, str]] = []
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(ds.get("SeriesInstanceUID", "") or "")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            bad.append((f, f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        if not uid:
            bad.append((f, "no SeriesInstanceUID"))
            continue
        groups[uid].append(f)
    return dict(groups), bad


def _identity(hdr) -> dict:
    def g(k):
        v = hdr.get(k) if hdr is not None else None
        return str(v) if v not in (None, "") else None

    return {"manufacturer": g("Manufacturer"), "model": g("ManufacturerModelName"),
            "device_serial": g("DeviceSerialNumber"), "station_name": g("StationName")}


def _finite(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def slices_to_json(result) -> list[dict]:
    """``analyze --per-slice``: every slice of the series with the per-slice metrics of every model."""
    vol = result.volume
    if vol is None:
        return []
    per_slice = {k: v for o in result.outputs for k, v in o.slice_metrics.items()}
    rows = []
    for i, uid in enumerate(vol.sop_instance_uids):
        hdr = vol.headers[i] if i < len(vol.headers) else None
        number = getattr(hdr, "InstanceNumber", None) if hdr is not None else None
        row = {"sop_instance_uid": uid, "instance_number": int(number) if number not in (None, "") else None,
               "metrics": {k: _finite(float(v[i])) for k, v in per_slice.items()}}
        if vol.frame_numbers[i] is not None:
            row["frame_number"] = vol.frame_numbers[i]
        rows.append(row)
    return rows


def result_to_json(result, scanner: str | None = None, per_slice: bool = False) -> dict:
    from analysis.volume import series_notes

    hdr = result.volume.header if result.volume is not None else None
    metrics = {k: (None if v is None or not math.isfinite(v) else v) for k, v in result.metrics.items()}
    # the out-of-distribution flag beside each score of a model whose training did not cover the series
    flags = {k: "outside the model's training distribution: " + "; ".join(o.out_of_distribution)
             for o in result.outputs if o.out_of_distribution for k in o.series_metrics}
    item = {
        "series_instance_uid": result.series_instance_uid,
        "study_instance_uid": result.study_instance_uid,
        "scanner": scanner,
        "scanner_identity": _identity(hdr),
        "n_instances": result.n_instances,
        "status": result.status,
        "reason": result.reason,
        "metrics": metrics,
        "metric_reasons": result.reasons,
        "info": result.info,
        "series_notes": series_notes(result.volume.meta) if result.volume is not None else [],
        "metric_flags": flags,
        "models": [{"name": o.name, "algorithm": o.algorithm, "version": o.version,
                    "weights_sha256": o.weights_sha256, "parameters": list(o.parameters),
                    "out_of_distribution": bool(o.out_of_distribution),
                    "out_of_distribution_reasons": list(o.out_of_distribution)} for o in result.outputs],
        # per requested model: selected or skipped, by which [[selection]] rule or default, and why
        "selection": [d.as_dict() for d in result.selection],
    }
    if per_slice:
        item["slices"] = slices_to_json(result)
    return item


def _fmt(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.4g}"


def print_text(items: list[dict], out=sys.stdout) -> None:
    for it in items:
        out.write(f"series {it['series_instance_uid']}  ({it['n_instances']} instances)\n")
        ident = it.get("scanner_identity") or {}
        who = " ".join(str(v) for v in ident.values() if v)
        out.write(f"  scanner   {it.get('scanner') or '-'}  {who}\n")
        out.write(f"  status    {it['status']}{'  (' + it['reason'] + ')' if it.get('reason') else ''}\n")
        for d in it.get("selection") or []:
            out.write(f"  {'runs' if d['selected'] else 'skips':<5} {d['model']:<10} rule {d['rule']}: {d['reason']}\n")
        for k, v in it["metrics"].items():
            why = it["metric_reasons"].get(k)
            out.write(f"  {k:<26} {_fmt(v):>12}{'   ' + why if v is None and why else ''}\n")
        for k, v in (it.get("info") or {}).items():
            out.write(f"  {k:<26} {v}\n")
        for m in it.get("models") or []:
            if m.get("out_of_distribution"):
                out.write(f"  {m['name']}: outside its training distribution: "
                          f"{'; '.join(m['out_of_distribution_reasons'])}\n")
        out.write("\n")


def analyze_calibrations(settings) -> dict:
    """The calibrations in use in the node's database (``qa-node calibrate``), for ``<metric>_likert``;
    none when there is no database yet (it is not created here)."""
    from node.calibrate import current_calibrations
    from storage.db import Database

    url = settings.node.database
    path = _sqlite_path(url)
    if url.startswith("sqlite") and (path is None or not path.is_file()):
        return {}
    db = Database(url)
    try:
        return current_calibrations(db)
    finally:
        db.dispose()


def cmd_analyze(args) -> int:
    from analysis.pipeline import analyse_series, parse_models
    from node.calibrate import apply_calibrations
    from node.worker import run_context

    settings = _load_optional(args)
    try:
        models = parse_models(args.models if args.models else settings.analysis.models)
        ctx = run_context(settings, args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    files = _collect_files(args.paths)
    if not files:
        raise UsageError("no files found under the given paths")
    groups, bad = group_by_series(files)
    for f, why in bad:
        log.warning("%s: skipped: %s", f, why)
    calibrations = analyze_calibrations(settings)
    items = []
    for uid, paths in groups.items():
        result = analyse_series(paths, models, ctx, series_instance_uid=uid, scanner=args.scanner,
                                selection=None if args.all_models else settings.selection_policy)
        apply_calibrations(result, calibrations)
        items.append(result_to_json(result, scanner=args.scanner, per_slice=args.per_slice))
    if args.json:
        json.dump(items, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_text(items)
    failed = any(it["status"] == "failed" for it in items)
    return EXIT_FAILED if failed or (bad and not items) else EXIT_OK


# -- serve -----------------------------------------------------------------------------------------
def _stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets (logged once), for the long-running commands."""
    stop = threading.Event()

    def _signal(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    return stop


def cmd_serve(args) -> int:
    from node.service import Node

    settings = _load(args)
    setup_logging(settings.node.log_level)
    ensure_database_folder(settings.node.database)
    node = Node(settings, min_free_bytes=int(args.min_free_mb * 1024 * 1024))
    stop = _stop_on_signals()
    from storage.nodelock import NodeLocked

    try:
        port = node.start()
    except NodeLocked as exc:  # another node serves this data folder or database: touch nothing
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.node.host}:{settings.node.port}: {exc.strerror or exc}") from None
    log.info("node %s ready on %s:%d (data in %s)", settings.node.ae_title, settings.node.host, port,
             settings.node.data_dir)
    if args.port_file:
        Path(args.port_file).write_text(str(port))
    stop.wait()
    node.stop()
    log.info("stopped")
    return EXIT_OK


# -- worker ----------------------------------------------------------------------------------------
def cmd_worker(args) -> int:
    """Analysis workers only: claim jobs from the configured database, read the series from the
    (shared) data folder, write and queue the outputs. No storage SCP, no node lock."""
    from node.workers import run_workers

    settings = _load(args)
    setup_logging(settings.node.log_level)
    n = args.workers if args.workers is not None else settings.analysis.workers
    if n < 1:
        raise UsageError(f"{settings.file}: analysis.workers = {n}: no worker to run; give --workers N (N >= 1)")
    if not Path(settings.node.data_dir).is_dir():
        raise UsageError(f"data folder {settings.node.data_dir} not found (on another machine: is the shared "
                         "folder mounted?)")
    db = open_existing_database(settings.node.database)
    db.dispose()
    if _sqlite_path(settings.node.database) is not None:
        log.info("database is SQLite: workers on this machine only (several machines need PostgreSQL)")
    stop = _stop_on_signals()
    run_workers(settings, n, stop)
    log.info("stopped")
    return EXIT_OK


# -- status ----------------------------------------------------------------------------------------
def status_dict(db) -> dict:
    """Everything `qa-node status` shows, as JSON-ready data."""
    from sqlalchemy import func, select

    from storage.models import InstanceConflict, Job, Series
    from storage.repo import latest_jobs, output_counts, outputs_state
    from analysis.selection import decisions_from_json

    with db.session() as s:
        series = s.scalars(select(Series).order_by(Series.id)).all()
        last_job = latest_jobs(s)
        n_out = output_counts(s)
        counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        conflicts = s.scalar(select(func.count()).select_from(InstanceConflict))
        rows = []
        outputs_counts: dict[str, int] = defaultdict(int)
        for x in series:
            j = last_job.get(x.id)
            if j is not None:
                state, error = outputs_state(j, n_out.get(j.id, 0))
            else:
                state, error = "pending", None  # receiving or just completed: its outputs are to come
            outputs_counts[state] += 1
            rows.append({
                "series_instance_uid": x.series_instance_uid, "scanner": x.scanner_name, "state": x.state,
                "n_instances": x.n_instances, "generation": x.generation, "completions": x.completions,
                "last_received_at": x.last_received_at.isoformat(),
                "job": None if j is None else {"id": j.id, "state": j.state, "outcome": j.outcome, "error": j.error},
                "outputs": state, "outputs_error": error,
                # which [[selection]] rule (or default) selected or skipped the series for which model
                "selection": decisions_from_json(j.selection) if j is not None else [],
            })
    return {"series": rows, "jobs": counts, "outputs": dict(outputs_counts), "instance_conflicts": conflicts}


def cmd_status(args) -> int:
    settings = _load(args)
    db = open_existing_database(settings.node.database)
    try:
        data = status_dict(db)
    finally:
        db.dispose()
    data["quarantined"] = _quarantined(settings)
    data["queue"] = _queue(settings)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    rows = data["series"]
    print(f"{'series':<66} {'scanner':<8} {'state':<10} {'n':>5} {'gen':>3}  {'job':<14} outputs")
    for r in rows:
        j = r["job"]
        js = "-" if j is None else f"{j['state']}{'/' + j['outcome'] if j['outcome'] else ''}"
        why = r["outputs_error"] or (j["error"] if j and j["outcome"] in ("skipped", "failed") else None)
        print(f"{r['series_instance_uid']:<66} {r['scanner'] or '-':<8} {r['state']:<10} {r['n_instances']:>5} "
              f"{r['generation']:>3}  {js:<14} {r['outputs']}{'  (' + why + ')' if why else ''}")
        sel = r.get("selection") or []
        if any(d.get("rule") != "default" for d in sel):  # plain defaults (every model ran) say nothing
            print("    selection: " + ", ".join(f"{d['model']} {'runs' if d['selected'] else 'skipped'} ({d['rule']})"
                                             for d in sel))
    print("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(data["jobs"].items())) or "none"))
    oc = data["outputs"]
    print("outputs: " + (", ".join(f"{k} {v}" for k, v in sorted(oc.items())) or "none")
          + (f"  <- {oc['failed']} series without results in PACS: see `qa-node rebuild-outputs --failed`"
             if oc.get("failed") else "")
          + (f"  <- {oc['partial']} series with an output missing by an error: see `qa-node rebuild-outputs "
             f"--failed --reanalyse`" if oc.get("partial") else ""))
    print(f"instance conflicts (same UID, different bytes): {data['instance_conflicts']}")
    if data["quarantined"] is not None:
        print(f"quarantined files (invalid instances found in the store at start-up): {data['quarantined']}")
    print_queue(data["queue"], settings.analysis.backlog_warn_s)
    return EXIT_OK


def _queue(settings) -> dict:
    from storage.repo import queue_stats

    db = open_existing_database(settings.node.database)
    try:
        return queue_stats(db, configured_workers=settings.analysis.workers).as_dict()
    finally:
        db.dispose()


def print_queue(q: dict, backlog_warn_s: float = 0.0, out=None) -> None:
    """The analysis queue lines of `qa-node status`."""
    from node.workers import _duration

    out = out or sys.stdout
    over = backlog_warn_s > 0 and q["oldest_wait_s"] is not None and q["oldest_wait_s"] > backlog_warn_s
    print(f"analysis queue: {q['depth']} waiting, {q['running']} running; oldest waiting "
          f"{_duration(q['oldest_wait_s']) if q['oldest_wait_s'] is not None else '-'}"
          + (f"  <- BACKLOG over analysis.backlog_warn_s ({_duration(backlog_warn_s)})" if over else ""), file=out)
    mean = f"mean job {_duration(q['mean_job_s'])} over the last {q['n_recent']}" if q["mean_job_s"] is not None \
        else "no finished job to time yet"
    eta = "0 s" if q["eta_s"] == 0 else (_duration(q["eta_s"]) if q["eta_s"] is not None else "unknown")
    print(f"ETA for the waiting jobs: {eta} ({mean}; {q['n_workers']} worker(s))", file=out)
    for w in q["workers"]:
        print(f"  worker {w['worker']}: {w['running']} running, {w['done_last_hour']} finished in the last hour",
              file=out)


def _quarantined(settings) -> int | None:
    try:
        from storage.filestore import quarantine_count
    except ImportError:
        return None
    return quarantine_count(settings.node.data_dir)


# -- outbox ----------------------------------------------------------------------------------------
def cmd_outbox(args) -> int:
    from storage.outbox import list_deliveries

    settings = _load(args)
    db = open_existing_database(settings.node.database)
    rows = list_deliveries(db, args.state)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not rows:
        print("outbox is empty" + (f" (state {args.state})" if args.state else ""))
        return EXIT_OK
    print(f"{'id':>5} {'kind':<5} {'destination':<12} {'state':<8} {'tries':>5}  detail")
    for r in rows:
        detail = r["last_error"] or (f"next try {r['next_attempt_at']}" if r["state"] == "pending" else
                                     f"sent {r['sent_at']}" if r["sent_at"] else "")
        print(f"{r['id']:>5} {r['kind']:<5} {r['destination']:<12} {r['state']:<8} {r['attempts']:>5}  {detail}")
    counts = defaultdict(int)
    for r in rows:
        counts[r["state"]] += 1
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return EXIT_OK


def cmd_resend(args) -> int:
    from storage.outbox import resend

    if not (args.id or args.dead or args.pending):
        raise UsageError("say what to resend: --id N (repeatable), --dead or --pending")
    settings = _load(args)
    db = open_existing_database(settings.node.database)
    n = resend(db, ids=args.id or (), dead=args.dead, pending=args.pending)
    print(f"{n} deliver{'y' if n == 1 else 'ies'} queued to be sent now (a running node sends them within "
          f"{settings.outbox.poll_s:g} s)")
    return EXIT_OK


# -- rebuild-outputs -------------------------------------------------------------------------------
def cmd_rebuild_outputs(args) -> int:
    from analysis.pipeline import parse_models
    from node.rebuild import rebuild_outputs
    from storage.filestore import FileStore
    from storage.repo import queue_reanalysis, series_for_rebuild

    if bool(args.series) == bool(args.failed):
        raise UsageError("say which outputs to rebuild: --series UID or --failed")
    settings = _load(args)
    db = open_existing_database(settings.node.database)
    try:
        try:
            targets = series_for_rebuild(db, series_uid=args.series, failed=args.failed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not targets:
            print("no series with failed outputs")
            return EXIT_OK
        if args.reanalyse:
            models = parse_models(settings.analysis.models)
            for series_id, _ in targets:
                queue_reanalysis(db, series_id, models)
            print(f"{len(targets)} series queued for a new analysis with {', '.join(models)} (a running "
                  "`qa-node serve` picks them up; outputs, maps included, are rebuilt when it finishes)")
            return EXIT_OK
        store = FileStore(settings.node.data_dir)
        failed = 0
        for _, job_id in targets:
            r = rebuild_outputs(settings, db, store, job_id)
            failed += r.outputs != "written"
            print(f"{r.series_instance_uid}  outputs {r.outputs}" + (f"  ({r.outputs_error})" if r.outputs_error else ""))
        dest = ", ".join(d.name for d in settings.destinations)
        print(f"{len(targets) - failed} of {len(targets)} series rebuilt from stored results"
              + (f" and queued for {dest} (a running node sends them within {settings.outbox.poll_s:g} s)"
                 if dest else " (no destinations configured)")
              + "; Parametric Maps are not stored: use --reanalyse for maps")
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        db.dispose()


# -- trends: service events, demo history ---------------------------------------------------------
def cmd_event_add(args) -> int:
    from datetime import datetime, time, timezone

    from reports.trends import reevaluate_scanner
    from storage.db import Database
    from storage.trends import add_service_event

    settings = _load(args)
    if settings.scanner_by_name(args.scanner) is None:
        known = ", ".join(s.name for s in settings.scanners) or "(none configured)"
        raise UsageError(f"unknown scanner {args.scanner!r}; known scanners: {known}")
    try:
        day = datetime.strptime(args.date, "%Y-%m-%d").date()
    except ValueError:
        raise UsageError(f"--date must be YYYY-MM-DD, got {args.date!r}") from None
    tz = settings.reporting.trends.tz()
    occurred = datetime.combine(day, time(0, 0), tzinfo=tz).astimezone(timezone.utc)
    ensure_database_folder(settings.node.database)
    db = Database(settings.node.database)
    db.create_all()
    with db.session() as s:
        try:
            ev = add_service_event(s, scanner=args.scanner, occurred_at=occurred, text=args.text,
                                   rebaseline=args.rebaseline)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        n = reevaluate_scanner(s, settings.reporting.trends, args.scanner, since=day) if args.rebaseline else 0
        print(f"service event {ev.id} recorded for {args.scanner} on {day.isoformat()}"
              + (f"; new baseline from that date ({n} alert(s) now fire in the re-evaluated period)"
                 if args.rebaseline else ""))
    return EXIT_OK


def cmd_demo_history(args) -> int:
    from reports.demo import generate_demo_history
    from storage.db import Database

    settings = _load_optional(args)
    url = args.database or f"sqlite:///{Path(settings.node.data_dir) / 'demo-history.sqlite'}"
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # throwaway: always a fresh history
    db = Database(url)
    db.create_all()
    n = generate_demo_history(db, args.scanner, args.days, seed=args.seed, settings=settings.reporting.trends)
    print(f"demo history: {n} series over {args.days} days for scanner {args.scanner} in {url}")
    print(f"see it with: qa-report --database {url} --scanner {args.scanner} --format html --out report.html")
    return EXIT_OK


# -- train -----------------------------------------------------------------------------------------
def _trainers() -> dict[str, str]:
    from analysis.models import specs

    return {name: spec.trainer for name, spec in specs().items() if spec.trainer}


TRAINERS = _trainers()  # model -> its trainer module (the model specs' `trainer`)


def cmd_train(args) -> int:
    import importlib

    if args.model is None:
        args.train_parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.model not in TRAINERS:
        raise UsageError(f"unknown model {args.model!r} to train; choose one of {', '.join(sorted(TRAINERS))}")
    module = importlib.import_module(TRAINERS[args.model])
    parser = argparse.ArgumentParser(prog=f"qa-node train {args.model}")
    module.add_arguments(parser)
    targs = parser.parse_args(args.rest)
    setup_logging("INFO")
    return int(module.run(targs))


# -- rate / ratings (site ratings for Delta-IQA and calibration) -------------------------------------
def _ratings_database(settings):
    """The node's database for rating commands: made (with its tables) when it is not there yet, so a
    site can rate a folder before the node has received anything."""
    from storage.db import Database

    path = _sqlite_path(settings.node.database)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(settings.node.database)
    db.create_all()
    return db


def cmd_rate(args) -> int:
    from node import rate

    settings = _load_optional(args)
    setup_logging(settings.node.log_level)
    if args.sample < 0:
        raise UsageError("--sample must be >= 0 (0 = every image)")
    if args.folder:
        folder = Path(args.folder)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder")
        db = _ratings_database(settings)
        items = rate.items_from_folder(folder)
    else:
        db = open_existing_database(settings.node.database)
        try:
            items = rate.items_from_store(db, settings.node.data_dir, args.series)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return rate.run(db, items, host=args.host, port=args.port, sample=args.sample, seed=args.seed)


def cmd_ratings(args) -> int:
    from node import ratings

    settings = _load_optional(args)
    if args.ratings_command == "export":
        db = open_existing_database(settings.node.database)
        n = ratings.export_ratings(db, args.out, rater=args.rater)
        print(f"{n} rating(s) written to {args.out}")
        return EXIT_OK
    try:
        rows = ratings.read_ratings_csv(args.file)
    except ratings.RatingsFileError as exc:
        ratings.print_problems(exc.path, exc.errors, "nothing imported", prefix="qa-node: ")
        return EXIT_USAGE
    db = _ratings_database(settings)
    n = ratings.import_ratings(db, rows)
    print(f"{n} rating(s) imported from {args.file}")
    return EXIT_OK


def cmd_calibrate(args) -> int:
    from node import calibrate

    settings = _load_optional(args)
    setup_logging(settings.node.log_level)
    return calibrate.run(args, settings, lambda: _ratings_database(settings))


# -- demo (the README's main job) --------------------------------------------------------------------
def cmd_demo(args) -> int:
    from node.demo import run_demo

    settings = _load(args)
    setup_logging("WARNING" if args.quiet else settings.node.log_level)
    return run_demo(settings, series_dir=Path(args.series), out=sys.stdout, stable_age_s=args.stable_age)


# -- parser ----------------------------------------------------------------------------------------
CONFIG_HELP = "configuration file (default: $CTQA_CONFIG, else ./config.toml)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qa-node", description="CT QA Node: receive CT series over DICOM, "
                                "measure image quality, send the results back to PACS.")
    p.add_argument("--config", help=CONFIG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    # --config is accepted before or after the subcommand (`qa-node serve --config FILE`)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub.add_parser = functools.partial(sub.add_parser, parents=[config])

    sp = sub.add_parser("serve", help="run the storage SCP, the scheduler and the analysis worker")
    sp.add_argument("--port-file", help="write the bound port here (useful with port = 0)")
    sp.add_argument("--min-free-mb", type=float, default=200.0,
                    help="refuse instances (Out of Resources) when less disk is free (default 200)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("worker", help="run analysis workers only (against the configured database and a "
                        "data folder shared with the receiving node)",
                        description="Analyse series received by another node: claim jobs from the configured "
                        "database (PostgreSQL across machines), read the instances from the shared node.data_dir, "
                        "build and send the outputs to this config's [[destinations]], record trends and alerts. "
                        "Use the receiving node's config.toml (same database, data folder, selection, models, "
                        "destinations); the receiving node runs serve with analysis.workers = 0. Stops on SIGTERM/"
                        "Ctrl-C, handing its running jobs back.")
    sp.add_argument("--workers", type=int, help="how many workers: 1 = one in this process, N >= 2 = N worker "
                    "processes (default: analysis.workers, which must then be >= 1)")
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("analyze", help="run the analysis pipeline on files or folders, without the network")
    sp.add_argument("paths", nargs="+", help="DICOM files or folders (grouped by series)")
    sp.add_argument("--json", action="store_true", help="print a JSON array, one object per series")
    sp.add_argument("--models", help="comma-separated models to run (default: [analysis] models)")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override [analysis] device")
    sp.add_argument("--per-slice", action="store_true",
                    help="with --json: add each series' slices (SOP Instance UID, Instance Number, per-slice metrics)")
    sp.add_argument("--scanner", help="the [[scanners]] name the files come from, for [[selection]] scanner patterns "
                                      "(default: none, so rules with a scanner key do not match)")
    sp.add_argument("--all-models", action="store_true",
                    help="run every requested model on every series: no [[selection]] rules, no defaults")
    sp.set_defaults(func=cmd_analyze)

    sp = sub.add_parser("status", help="show received series, their state and analysis jobs",
                        description="The analysis queue (waiting and running jobs, the oldest waiting job's age, "
                        "jobs per worker, an ETA, a BACKLOG mark over analysis.backlog_warn_s), then each "
                        "received series: state, instances, job outcome, outputs and which [[selection]] rule "
                        "or default selected or skipped it for which model.")
    sp.add_argument("--json", action="store_true", help="print one JSON object: queue and series (with each "
                    "series' selection decisions)")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("outbox", help="list result deliveries: pending, sent and dead")
    sp.add_argument("--state", choices=["pending", "sent", "dead"], help="only deliveries in this state")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_outbox)

    sp = sub.add_parser("resend", help="retry deliveries now (dead ones included when asked)")
    sp.add_argument("--id", type=int, action="append", help="delivery id (repeatable)")
    sp.add_argument("--dead", action="store_true", help="every dead delivery")
    sp.add_argument("--pending", action="store_true", help="every pending delivery, without waiting")
    sp.set_defaults(func=cmd_resend)

    sp = sub.add_parser("rebuild-outputs", help="build and queue the outputs (SR, report) of analysed series "
                        "again from the stored results, without re-running the models",
                        description="Build and queue the outputs of analysed series again from the results "
                        "stored in the database, without re-running the models. The database keeps series "
                        "and per-slice metrics, not pixel maps: the SR and the readable report are rebuilt; "
                        "a Parametric Map only where it was already written. --reanalyse re-runs the models "
                        "(a new analysis job for a running `qa-node serve`), which rebuilds every output, "
                        "maps included.")
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--series", metavar="UID", help="one series (Series Instance UID)")
    what.add_argument("--failed", action="store_true", help="every series whose outputs failed or partly failed (see `qa-node status`)")
    sp.add_argument("--reanalyse", action="store_true",
                    help="re-run the models instead (queues a new analysis job; maps are rebuilt too)")
    sp.set_defaults(func=cmd_rebuild_outputs)

    sp = sub.add_parser("event", help="service events (shown on charts; optionally a new baseline)")
    esub = sp.add_subparsers(dest="event_command", required=True)
    esub.add_parser = functools.partial(esub.add_parser, parents=[config])
    ep = esub.add_parser("add", help="record a service event for a scanner")
    ep.add_argument("--scanner", required=True, help="scanner name from config.toml")
    ep.add_argument("--date", required=True, help="date of the event, YYYY-MM-DD (site time zone)")
    ep.add_argument("--text", required=True, help='what happened, e.g. "tube replaced"')
    ep.add_argument("--rebaseline", action="store_true", help="start a new baseline from this date")
    ep.set_defaults(func=cmd_event_add)

    sp = sub.add_parser("demo-history", help="fill a throwaway database with a synthetic trend history")
    sp.add_argument("--scanner", default="CT1")
    sp.add_argument("--days", type=int, default=90)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--database", help="SQLAlchemy URL (default: sqlite under data_dir/demo-history.sqlite)")
    sp.set_defaults(func=cmd_demo_history)

    sp = sub.add_parser("train", help=f"train a model ({', '.join(sorted(TRAINERS))}); see `qa-node train MODEL --help`",
                        usage=f"qa-node train {{{','.join(sorted(TRAINERS))}}} [options]",
                        description="Train a model; `qa-node train MODEL --help` lists that model's options "
                        "(see the model cards in analysis/weights/).")
    sp.add_argument("model", nargs="?", help=f"one of {', '.join(sorted(TRAINERS))}")
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the model's own options")
    sp.set_defaults(func=cmd_train, train_parser=sp)

    sp = sub.add_parser("rate", help="a local web page on which raters score slices 0-4 (Likert); scores go into the database",
                        description="Serve a rating page (loopback only by default): slices sampled from received series "
                        "(or a folder of DICOM files) in a CT window, scored 0-4 on the LDCTIQA / Delta-IQA Likert scale "
                        "(keys 0-4, S skip, U undo, W window). Every score is stored with the rater's name, the time, "
                        "the SOP Instance UID, the frame and the file. No patient name or ID is shown.")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--series", nargs="+", metavar="UID", help="received series to sample from (default: all received)")
    src.add_argument("--folder", metavar="DIR", help="a folder of DICOM files instead of the node's store")
    sp.add_argument("--sample", type=int, default=50, metavar="K", help="images to sample, in random order (default 50; 0 = all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the sample and its order")
    sp.add_argument("--port", type=int, default=8765, help="port of the page (default 8765; 0 = any free port)")
    sp.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    sp.set_defaults(func=cmd_rate)

    sp = sub.add_parser("ratings", help="export or import raters' scores (CSV: path,score[,rater,frame,sop_instance_uid])")
    rsub = sp.add_subparsers(dest="ratings_command", required=True)
    rsub.add_parser = functools.partial(rsub.add_parser, parents=[config])
    rp = rsub.add_parser("export", help="write the stored ratings (withdrawn ones left out) as a ratings CSV")
    rp.add_argument("--out", required=True, metavar="FILE")
    rp.add_argument("--rater", help="only this rater's scores")
    rp.set_defaults(func=cmd_ratings)
    rp = rsub.add_parser("import", help="check a ratings CSV (every bad row listed with its line; exit 2) and store it")
    rp.add_argument("file", metavar="FILE")
    rp.set_defaults(func=cmd_ratings)

    sp = sub.add_parser("calibrate", help="check every score against a ratings file (PLCC/SROCC/KROCC with CIs) and "
                        "store its map to the site's Likert scale; analyses then carry <metric>_likert",
                        description="For each calibratable metric, score the rated images as `analyze --per-slice` "
                        "does, compute the raw and cross-validated (folds split by series) PLCC, SROCC, KROCC and "
                        "the LDCTIQAC aggregate |PLCC|+|SROCC|+|KROCC| with series-bootstrap 95 % CIs, fit a "
                        "monotone map score -> Likert 0-4 (isotonic or 5-parameter logistic, by cross-validated "
                        "error) and store it in the database (table calibrations). The newest calibration of a "
                        "metric is applied to the series value of every later analysis (SR, analyze --json: "
                        "<metric>_likert). A metric whose model has no weights is reported 'not available'. "
                        "Exit 0: at least one metric calibrated; 1: none; 2: bad ratings file or metric.")
    from node.calibrate import add_arguments as calibrate_arguments

    calibrate_arguments(sp)
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("demo", help="start the node, push a series to it with a real SCU, print the results")
    sp.add_argument("--series", default=str(Path("..") / "shared" / "data" / "ct" / "philips_head_phantom" / "S2020_1mm_std"),
                    help="folder of the series to push (default: the shared 140-slice phantom series)")
    sp.add_argument("--stable-age", type=float, default=3.0,
                    help="series completion idle time for the demo in seconds (default 3)")
    sp.add_argument("--quiet", action="store_true", help="log warnings only")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging("WARNING" if args.command in ("analyze", "status") else "INFO")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"qa-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"qa-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NoDatabase as exc:
        print(f"qa-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def report_main(argv: Sequence[str] | None = None) -> int:
    """``qa-report``: the physicist's trend report (see reports.qa_report)."""
    from reports import qa_report
    from storage.db import Database

    parser = argparse.ArgumentParser(prog="qa-report", description="Per-scanner image-quality trend report.")
    parser.add_argument("--config", help="configuration file (default: $CTQA_CONFIG, else ./config.toml)")
    parser.add_argument("--database", help="SQLAlchemy URL to read instead of node.database "
                        "(e.g. the one `qa-node demo-history` printed)")
    qa_report.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    try:
        settings = _load(args)
        db = open_existing_database(args.database or settings.node.database)
        return int(qa_report.run(args, db, [s.name for s in settings.scanners], settings.reporting.trends))
    except ConfigError as exc:
        print(f"qa-report: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NoDatabase as exc:
        print(f"qa-report: {exc}", file=sys.stderr)
        return EXIT_FAILED
