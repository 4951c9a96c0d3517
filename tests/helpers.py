"""Shared test helpers: paths to real data, free ports, config files, a node process, DICOM peers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PHANTOM_1MM = SHARED_DATA / "ct" / "philips_head_phantom" / "S2020_1mm_std"
PHANTOM_5MM = SHARED_DATA / "ct" / "philips_head_phantom" / "S2010_5mm"
WG04 = SHARED_DATA / "dicom" / "wg04"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (CI has it beside the repository)")
    return path


def require_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} not installed (apt-get install dcmtk dicom3tools orthanc; .ci/run does it)")
    return exe


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline (pip install pydicom-data)")
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, *, data_dir: Path, port: int = 0, stable_age_s: float = 2.0,
                 scanners: str | None = None, extra: str = "", models: str = '["basic"]') -> Path:
    scanners = scanners if scanners is not None else (
        '[[scanners]]\nname = "CT1"\nae_title = "CT1"\nhosts = ["127.0.0.1"]\n'
    )
    path.write_text(
        f"""[node]
ae_title = "CTQA"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
database = "sqlite:///{data_dir}/ctqa.sqlite"
stable_age_s = {stable_age_s}
log_level = "INFO"

{scanners}
[analysis]
device = "cpu"
models = {models}
{extra}
"""
    )
    return path


def pacs_destination(port: int, *, ae_title: str = "ORTHANC", tls: bool = False, outbox: bool = True,
                     retry_initial_s: float = 1, retry_max_s: float = 2, poll_s: float = 0.5) -> str:
    """TOML of one destination "PACS" on loopback (e.g. a LocalOrthanc's DICOM ``port``) and, unless
    ``outbox`` is False, the ``[outbox]`` retry timing (fast, for tests): ``write_config``'s ``extra``,
    which comes after the [analysis] keys."""
    text = (f'\n[[destinations]]\nname = "PACS"\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {port}\n'
            + ("tls = true\n" if tls else ""))
    if outbox:
        text += f"\n[outbox]\nretry_initial_s = {retry_initial_s}\nretry_max_s = {retry_max_s}\npoll_s = {poll_s}\n"
    return text


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the File Meta Information (what travels over DIMSE)."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not in DICOM file format"
    # (0002,0000) UL group length: tag(4) VR(2) len(2) value(4) starts at 132
    assert raw[132:136] == b"\x02\x00\x00\x00"
    group_len = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + group_len:]


class NodeProcess:
    """`qa-node serve` in a subprocess on a free port."""

    def __init__(self, config: Path, workdir: Path, min_free_mb: int = 0) -> None:
        self.config = config
        self.workdir = workdir
        self.min_free_mb = min_free_mb  # serve --min-free-mb
        self.port_file = workdir / "port.txt"
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 60.0) -> int:
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(self.config), "serve", "--port-file",
             str(self.port_file), "--min-free-mb", str(self.min_free_mb)],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"qa-node serve exited early:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"qa-node serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc


def storescu(port: int, *files_or_dirs: Path, calling: str = "CT1", called: str = "CTQA",
             extra: tuple[str, ...] = (), verbose: bool = False) -> subprocess.CompletedProcess:
    exe = require_tool("storescu")
    cmd = [exe, "-aet", calling, "-aec", called, "+sd", "+r", "-nh", *extra]
    if verbose:
        cmd.append("-v")
    cmd += ["127.0.0.1", str(port), *map(str, files_or_dirs)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"),
                          timeout=300)


def qa_node(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def analyze_json(series: Path, *models: str, cwd: Path, config: Path | None = None) -> dict:
    """`qa-node [--config CONFIG] analyze --json --models M1,M2,... SERIES` of one series: its one
    item, checked to be analysed with each of ``models``."""
    import json

    r = qa_node(*(("--config", str(config)) if config else ()), "analyze", "--json", "--models", ",".join(models),
                str(series), cwd=cwd)
    assert r.returncode == 0, r.stderr
    (item,) = json.loads(r.stdout)
    assert item["status"] == "done"
    assert set(models) <= {m["name"] for m in item["models"]}
    return item


def node_status(node: NodeProcess) -> dict:
    """`qa-node status --json` of a running node."""
    import json

    r = qa_node("--config", str(node.config), "status", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def node_sql(node: NodeProcess, sql: str, *params) -> list[tuple]:
    """The rows of a read-only query on a running node's SQLite database ([] while it does not exist
    or is busy). For polling: each `qa-node status` / `outbox` subprocess costs seconds of CPU that
    the node under test then lacks on a 2-core runner. Poll with this, then assert on the CLI's
    own output once the state is reached."""
    import sqlite3
    import tomllib

    url = tomllib.loads(Path(node.config).read_text())["node"]["database"]
    if not url.startswith("sqlite:///"):
        raise ValueError(f"node_sql reads SQLite databases only, not {url.split(':', 1)[0]}")
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # a table not created yet, or locked past the timeout
        return []


def wait_until(pred, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- DICOM TLS: a throwaway PKI ---------------------------------------------------------------------

class TlsPki:
    """A test CA with leaf certificates for the node, a PACS and a scanner (all naming 127.0.0.1 and
    localhost), "wrongname" (signed by the CA but naming only elsewhere.example), and a second CA with
    a "stranger" certificate (signed by nobody the node trusts). RSA 2048, made with openssl."""

    LEAVES = ("node", "pacs", "scanner")

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca(self) -> Path:
        return self.path("ca.crt")

    @property
    def other_ca(self) -> Path:
        return self.path("other-ca.crt")

    def cert(self, leaf: str) -> Path:
        return self.path(f"{leaf}.crt")

    def key(self, leaf: str) -> Path:
        return self.path(f"{leaf}.key")

    def make(self) -> "TlsPki":
        openssl = require_tool("openssl")
        self.folder.mkdir(parents=True, exist_ok=True)
        ext = self.path("leaf.ext")
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True, cwd=self.folder, timeout=60)

        for ca in ("ca", "other-ca"):
            run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN=CT QA test {ca}")
        self.path("wrongname.ext").write_text(ext.read_text().replace("DNS:localhost,IP:127.0.0.1",
                                                                      "DNS:elsewhere.example"))
        for leaf, ca, ext_file in [*((leaf, "ca", "leaf.ext") for leaf in self.LEAVES),
                                   ("wrongname", "ca", "wrongname.ext"), ("stranger", "other-ca", "leaf.ext")]:
            run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                "-subj", f"/CN={leaf}")
            run("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{leaf}.crt", "-days", "2", "-extfile", ext_file)
        return self

    def tls_section(self, port: int = -1, require_client_certificate: bool = True) -> str:
        """A [tls] table for the node's config.toml."""
        return (f'[tls]\nport = {port}\ncertificate = "{self.cert("node")}"\nprivate_key = "{self.key("node")}"\n'
                f'ca_certificates = "{self.ca}"\nrequire_client_certificate = '
                f'{"true" if require_client_certificate else "false"}\n')


# -- outbox objects built cheaply -------------------------------------------------------------------

PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
TINY_PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
            b"trailer<</Root 1 0 R>>\n%%EOF\n")


def queue_outbox_objects(db, store, n: int, destinations: list[str], *, implicit_every: int = 0,
                         study_uid: str | None = None) -> list[str]:
    """Record ``n`` small real output objects (alternately Encapsulated PDF and Basic Text SR, one
    study, one series row) in the outbox for ``destinations``; every ``implicit_every``-th file is
    written in Implicit VR Little Endian. Returns their SOP Instance UIDs in queue order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from storage.models import Series, SeriesState
    from storage.outbox import record_output

    study_uid = study_uid or generate_uid()
    src_series = generate_uid()
    with db.session() as s:
        row = Series(series_instance_uid=src_series, study_instance_uid=study_uid, modality="CT",
                     state=SeriesState.COMPLETE, completions=1)  # an analysed series: not completed again
        s.add(row)
        s.flush()
        series_id = row.id
    out_series = {PDF_STORAGE: generate_uid(), BASIC_TEXT_SR: generate_uid()}
    uids = []
    for i in range(n):
        sop_class = PDF_STORAGE if i % 2 == 0 else BASIC_TEXT_SR
        uid = generate_uid()
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, out_series[sop_class]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "OUTBOX^TEST", "OBX1", "", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 9902 if sop_class == PDF_STORAGE else 9901, i + 1
        ds.Manufacturer = "CT QA Node tests"
        if sop_class == PDF_STORAGE:
            ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
            ds.BurnedInAnnotation, ds.DocumentTitle = "NO", "outbox test"
            ds.ConceptNameCodeSequence = []
            ds.EncapsulatedDocument = TINY_PDF
        else:
            ds.Modality, ds.CompletionFlag, ds.VerificationFlag = "SR", "COMPLETE", "UNVERIFIED"
            ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "11528-7", "LN", "Radiology Report"
            ds.ConceptNameCodeSequence = [code]
            ds.ContentDate, ds.ContentTime = "20261201", "120000"
        implicit = bool(implicit_every) and i % implicit_every == implicit_every - 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        rel = store.output_rel_path(study_uid, out_series[sop_class], uid)
        path = store.abs(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        record_output(db, series_id=series_id, job_id=None, kind="pdf" if sop_class == PDF_STORAGE else "sr",
                      sop_class_uid=sop_class, sop_instance_uid=uid, rel_path=rel, destinations=destinations)
        uids.append(uid)
    return uids
