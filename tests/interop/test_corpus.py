"""The real-world corpus (``../shared/data/corpus``, see its README) through one running node to a real
Orthanc: for every series either its outputs (SR, map(s), PDF) in the source study, each accepted by
dciodvfy (no Error line), or a ``skipped`` / ``failed`` state (or a refusal at C-STORE) whose reason
names the problem. No traceback in the node's log, no silent gap.

Several corpus folders are the same image in different encodings (cornerstone3D writes one CT image in
every transfer syntax, with the same Study/Series and often the same SOP Instance UID). Pushed as they
are, the node would rightly keep the first copy and count the others as conflicts, so a folder whose
UIDs an earlier folder already used gets new, deterministic Study/Series/SOP Instance UIDs in a copy
(written in its own transfer syntax; nothing else changes). Only these UIDs differ from the corpus.

DCMTK's storescu sends what it can, proposing each folder's own transfer syntax; it has no option
for JPEG Lossless Process 14 (non-SV1) or the retired JPEG syntaxes, refuses some files it cannot
parse, and does not propose SOP classes outside its default list (Legacy Converted Enhanced CT):
those are sent by pynetdicom, with the file's own bytes and transfer syntax (listed with -s).
A retired transfer syntax (JPEG Extended 3/5, Spectral 10/12) is refused at association negotiation:
that is the node's documented conformance, and the outcome the test expects for it.

Run with ``-s`` to see the table of outcomes per folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.orthanc import LocalOrthanc
from tests.helpers import SHARED_DATA, NodeProcess, node_sql, pacs_destination, qa_node, require, require_tool, \
    write_config

pytestmark = pytest.mark.interop

CORPUS = SHARED_DATA / "corpus"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
# The known truth (corpus README: what a correct node does with each): the folders whose series must
# not get outputs, the outcome and what its reason must name. Every other folder must get SR, PDF and
# a map, or, where its source has no FrameOfReferenceUID, SR and PDF with the map left out for that.
EXPECTED = {
    "cornerstone3D/GE_HiSpeedCTi_TS_JPEGProcess10_12": ("REFUSED", r"1\.2\.840\.10008\.1\.2\.4\.55 not accepted"),
    "cornerstone3D/GE_HiSpeedCTi_TS_JPEGProcess6_8": ("REFUSED", r"1\.2\.840\.10008\.1\.2\.4\.53 not accepted"),
    "pydicom-data/Siemens_Definition_bad_sequence": ("REFUSED", r"is not a valid DICOM UID"),  # hex digits in UIDs
    "pylibjpeg-data/Anon_JPEGLossless_bad": ("FAILED", r"plausible CT numbers"),  # corrupt JPEG stream
    "pylibjpeg-data/Philips_Brilliance64_localizer_J2K": ("SKIPPED", r"localizer"),
    "pylibjpeg-data/Toshiba_Aquilion_J2K_SIZ0_MPR": ("SKIPPED", r"not axial"),
}


@dataclass
class Folder:
    name: str  # e.g. "cornerstone3D/GE_HiSpeedCTi_TS_RLELossless"
    files: list[Path]
    series_uid: str = ""
    study_uid: str = ""
    remapped: bool = False
    sent_with: str = "storescu"
    store_statuses: list[str] = field(default_factory=list)


def corpus_folders() -> list[Path]:
    root = require(CORPUS)
    return sorted(p for p in root.glob("*/*") if p.is_dir())


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name != "LICENSE")


def prepare_corpus(dest: Path) -> list[Folder]:
    """Copy folders whose UIDs collide with an earlier folder's, with new UIDs; others are used in place."""
    seen: set[str] = set()
    out = []
    for folder in corpus_folders():
        name = str(folder.relative_to(CORPUS))
        files = _dicom_files(folder)
        headers = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
        uids = {str(h.get(k, "")) for h in headers for k in UID_KEYWORDS}
        if uids & seen:
            target = dest / name
            target.mkdir(parents=True)
            new = {}
            for f in files:
                ds = pydicom.dcmread(f, force=True)
                for k in UID_KEYWORDS:
                    old = str(ds.get(k, ""))
                    if old:
                        new.setdefault(old, generate_uid(entropy_srcs=[name, old]))
                        setattr(ds, k, new[old])
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(target / f.name, enforce_file_format=True)
            files = _dicom_files(target)
            headers = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
            uids = {str(h.get(k, "")) for h in headers for k in UID_KEYWORDS}
            remapped = True
        else:
            remapped = False
        seen |= uids
        out.append(Folder(name, files, str(headers[0].get("SeriesInstanceUID", "")),
                          str(headers[0].get("StudyInstanceUID", "")), remapped))
    return out


# storescu's option that proposes a file's own transfer syntax (DCMTK has none for JPEG Lossless
# Process 14 non-SV1 and the retired JPEG syntaxes: pynetdicom sends those)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
}


def send(port: int, folder: Folder) -> None:
    """storescu first, proposing the files' own transfer syntax; where DCMTK cannot send a file,
    pynetdicom sends the file's own bytes."""
    exe = require_tool("storescu")
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
                for f in folder.files}
    flag = [STORESCU_PROPOSE[ts] for ts in syntaxes if ts in STORESCU_PROPOSE][:1] if len(syntaxes) == 1 else []
    r = subprocess.run([exe, "-v", *flag, "-aet", "CT1", "-aec", "CTQA", "-nh", "127.0.0.1", str(port),
                        *map(str, folder.files)], capture_output=True, text=True, timeout=120)
    folder.store_statuses = re.findall(r"Received Store Response \(([^)]*)\)", r.stdout + r.stderr)
    if r.returncode == 0 and len(folder.store_statuses) == len(folder.files):
        return
    from pynetdicom import AE

    why = [ln for ln in (r.stdout + r.stderr).splitlines() if "unable to convert" in ln or ln.startswith("E:")]
    folder.sent_with = f"pynetdicom (storescu: {why[0].split(': ', 2)[-1] if why else 'rc ' + str(r.returncode)})"
    ae = AE(ae_title="CT1")
    for f in folder.files:
        meta = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        ae.add_requested_context(str(meta.SOPClassUID), [str(meta.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CTQA")
    if not assoc.is_established:  # e.g. a retired transfer syntax the node does not accept
        folder.store_statuses = ["no presentation context accepted"] * len(folder.files)
        return
    try:
        folder.store_statuses = []
        for f in folder.files:
            st = assoc.send_c_store(f)
            folder.store_statuses.append(f"0x{int(st.Status):04X}" if "Status" in st else "no response")
    finally:
        assoc.release()


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    p = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip().startswith("Error")]


def status_json(node: NodeProcess) -> dict:
    r = qa_node("--config", str(node.config), "status", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def outbox_json(node: NodeProcess) -> list[dict]:
    r = qa_node("--config", str(node.config), "outbox", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _settled(row: dict) -> bool:
    job = row.get("job")
    if row["state"] != "complete" or job is None or job["state"] not in ("done", "failed"):
        return False
    return row.get("outputs", "written") != "pending"


# what _settled reads from `qa-node status --json`, straight from the database (a cheap poll): each
# series' state, and the state and outputs state of its newest job
SETTLED_SQL = ("SELECT s.series_instance_uid, s.state = 'complete' AND j.state IN ('done', 'failed') "
               "AND coalesce(j.outputs, '') != 'pending' FROM series s LEFT JOIN jobs j "
               "ON j.id = (SELECT max(id) FROM jobs WHERE series_id = s.id)")
UNSENT_SQL = "SELECT count(*) FROM deliveries WHERE state NOT IN ('sent', 'dead')"


def test_every_corpus_series_gets_outputs_or_a_reason(tmp_path):
    require_tool("Orthanc")
    require_tool("storescu")
    require_tool("dciodvfy")
    folders = prepare_corpus(tmp_path / "remapped")
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=1.0,
                           models='["basic", "classical"]', extra=pacs_destination(pacs.dicom_port))
        node = NodeProcess(cfg, tmp_path)
        node.start()
        try:
            for f in folders:
                send(node.port, f)
            # a folder whose every C-STORE was refused (or never negotiated) has no series to wait for;
            # should another not appear, once the others are settled stragglers get a few seconds
            expected = {f.series_uid for f in folders if any(st in ("Success", "0x0000") for st in f.store_statuses)}
            deadline, quiet_since = time.monotonic() + 150, None
            while time.monotonic() < deadline:
                seen = dict(node_sql(node, SETTLED_SQL))
                settled = all(seen.values()) and node_sql(node, UNSENT_SQL) == [(0,)]
                if settled and expected <= set(seen):
                    break
                quiet_since = (quiet_since or time.monotonic()) if settled else None
                if quiet_since is not None and time.monotonic() - quiet_since > 8:
                    break
                time.sleep(0.5)
            rows = {r["series_instance_uid"]: r for r in status_json(node)["series"]}
            box = outbox_json(node)
            log = node.log()
        finally:
            node.stop()
        table, problems = [], []
        for f in folders:
            row = rows.get(f.series_uid)
            verdict = _judge(f, row, box, pacs, tmp_path / "var", log)
            want, pattern = EXPECTED.get(f.name, ("OUTPUTS", None))
            if verdict[0] != "PROBLEM" and verdict[0] != want:
                verdict = ("PROBLEM", f"{verdict[0]} ({verdict[1]}); expected {want}")
            elif verdict[0] == want and pattern and not re.search(pattern, verdict[1]):
                verdict = ("PROBLEM", f"{want} but the reason does not name the problem /{pattern}/: {verdict[1]}")
            table.append(f"{f.name:<62} {verdict[0]:<9} {verdict[1]}")
            if verdict[0] == "PROBLEM":
                problems.append(f"{f.name}: {verdict[1]}")
        print("\n" + "\n".join(table))
        print(f"\n{len(folders) - len(problems)} of {len(folders)} corpus series OK")
        for f in folders:
            if f.sent_with != "storescu":
                print(f"  {f.name}: sent with {f.sent_with}")
        n_tb = len(TRACEBACK.findall(log))
        if n_tb:
            problems.append(f"{n_tb} traceback(s) in the node log, e.g.:\n" + _first_traceback(log))
        assert problems == [], "\n".join(problems)


def _judge(f: Folder, row: dict | None, box: list[dict], pacs: LocalOrthanc, data_dir: Path,
           log: str) -> tuple[str, str]:
    """(OUTPUTS|SKIPPED|FAILED|REFUSED|PROBLEM, detail) for one corpus folder."""
    refused = [s for s in f.store_statuses if s not in ("Success", "0x0000")]
    if row is None:
        if f.store_statuses and all(s == "no presentation context accepted" for s in f.store_statuses):
            ts = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
                  for p in f.files}
            return "REFUSED", f"transfer syntax {', '.join(sorted(ts))} not accepted at association negotiation"
        if refused and len(refused) == len(f.files):
            sops = [str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in f.files]
            why = [next((ln.split("C-STORE refused: ", 1)[1] for ln in log.splitlines()
                         if "C-STORE refused" in ln and sop in ln), None) for sop in sops]
            if None in why:
                return "PROBLEM", f"C-STORE {', '.join(sorted(set(refused)))} with no node log line naming why"
            return "REFUSED", f"C-STORE {', '.join(sorted(set(refused)))}: {why[0]}"
        return "PROBLEM", f"never stored (store responses {f.store_statuses or 'none'}, sent with {f.sent_with})"
    job = row.get("job") or {}
    outcome, reason = job.get("outcome"), job.get("error")
    if not _settled(row):
        return "PROBLEM", f"not settled: state {row['state']}, job {job.get('state')}, outputs {row.get('outputs')}"
    if outcome in ("skipped", "failed") or job.get("state") == "failed":
        if not reason:
            return "PROBLEM", f"{outcome} without a reason"
        return outcome.upper(), reason
    # analysed: outputs must be in the source study and pass dciodvfy
    outputs_state = row.get("outputs")
    if outputs_state == "failed":
        return "PROBLEM", f"outputs failed: {row.get('outputs_error')}"
    found = {i["sop_instance_uid"]: i for i in pacs.instances_in_study(f.study_uid)}
    source_sops = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in f.files}
    new = {k: v for k, v in found.items() if k not in source_sops}
    # our outputs for this series are those in the study whose Referenced series is ours: the study is
    # the folder's own (one series per study in the corpus except remapped copies, which have their own)
    if not new:
        return "PROBLEM", f"analysed ({outcome}) but no output in the source study (outputs {outputs_state}: " \
                          f"{row.get('outputs_error') or (reason or 'no reason')})"
    kinds = sorted({_kind(i["sop_class_uid"]) for i in new.values()})
    if not {"sr", "pdf"} <= set(kinds):
        return "PROBLEM", f"outputs in PACS: {kinds}; SR and PDF expected ({row.get('outputs_error')})"
    has_for = any("FrameOfReferenceUID" in pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in f.files)
    if has_for and "pmap" not in kinds:
        return "PROBLEM", f"no Parametric Map in PACS for a source with a Frame of Reference ({row.get('outputs_error')})"
    if not has_for and ("pmap" in kinds or "Frame of Reference" not in (row.get("outputs_error") or "")):
        return "PROBLEM", f"source without Frame of Reference: map expected left out with that reason, got {kinds} " \
                          f"({row.get('outputs_error')})"
    errors = []
    for path in (data_dir / "outputs").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.SOPInstanceUID) in new:
            errs = dciodvfy_errors(path)
            if errs:
                errors.append(f"{_kind(str(ds.SOPClassUID))}: {errs[0]}" + (f" (+{len(errs) - 1})" if len(errs) > 1 else ""))
    if errors:
        return "PROBLEM", "dciodvfy: " + "; ".join(errors)
    left_out = row.get("outputs_error") or (reason or "")
    return "OUTPUTS", "+".join(kinds) + (f"  ({left_out})" if left_out else "")


def _first_traceback(log: str) -> str:
    lines = log.splitlines()
    i = next(i for i, ln in enumerate(lines) if TRACEBACK.search(ln))
    end = next((j for j in range(i + 1, len(lines)) if re.match(r"\d{4}-\d\d-\d\d ", lines[j])), len(lines))
    return "\n".join(lines[max(0, i - 1):end])


def _kind(sop_class: str) -> str:
    return {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.30": "pmap",
            "1.2.840.10008.5.1.4.1.1.104.1": "pdf"}.get(sop_class, sop_class)
