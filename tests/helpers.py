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

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.port_file = workdir / "port.txt"
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 60.0) -> int:
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(self.config), "serve", "--port-file",
             str(self.port_file), "--min-free-mb", "0"],
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


def node_status(node: NodeProcess) -> dict:
    """`qa-node status --json` of a running node."""
    import json

    r = qa_node("--config", str(node.config), "status", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_until(pred, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
