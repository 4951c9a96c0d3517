"""A throwaway local Orthanc PACS on loopback, for the demo and the interop tests.

It knows our node's AE (so it accepts our C-STOREs) and exposes its REST API on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalOrthanc:
    def __init__(self, *, ae_title: str = "ORTHANC", known_aes: dict[str, tuple[str, int]] | None = None,
                 workdir: Path | None = None, dicom_port: int | None = None, http_port: int | None = None,
                 tls: dict[str, str | bool] | None = None) -> None:
        """``tls``: DICOM TLS on the DICOM port (Orthanc 1.9+), with keys ``certificate``,
        ``private_key``, ``trusted_certificates`` (PEM paths) and ``remote_certificate_required``
        (default true); the known AEs are then reached over TLS too."""
        self.exe = shutil.which("Orthanc")
        if self.exe is None:
            raise FileNotFoundError("Orthanc not found: install it with `apt-get install orthanc`")
        self.ae_title = ae_title
        self.known_aes = known_aes or {}
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ctqa-orthanc-"))
        self.dicom_port = dicom_port or _free_port()
        self.http_port = http_port or _free_port()
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _config(self) -> dict:
        cfg = self._plain_config()
        if self.tls:
            cfg.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls["certificate"]),
                "DicomTlsPrivateKey": str(self.tls["private_key"]),
                "DicomTlsTrustedCertificates": str(self.tls["trusted_certificates"]),
                "DicomTlsRemoteCertificateRequired": bool(self.tls.get("remote_certificate_required", True)),
                "DicomModalities": {name: {"AET": name, "Host": host, "Port": port, "UseDicomTls": True}
                                    for name, (host, port) in self.known_aes.items()},
            })
        return cfg

    def _plain_config(self) -> dict:
        return {
            "Name": "ctqa-local",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpBindAddress": "127.0.0.1",  # ignored by old versions; RemoteAccessAllowed=false still applies
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {name: [name, host, port] for name, (host, port) in self.known_aes.items()},
            "Plugins": [],
            "StableAge": 2,
            "SaveJobs": False,
        }

    def start(self, timeout: float = 60.0) -> "LocalOrthanc":
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self._config(), indent=2))
        self._log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.exe, str(cfg)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, body) -> object:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read().decode())

    def instances_in_study(self, study_uid: str) -> list[dict]:
        """Every instance of a study with its modality, SOP class and series, via the REST API."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                          "Expand": True})
        out = []
        for inst in found:
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"id": inst["ID"], "sop_class_uid": tags.get("SOPClassUID"),
                        "sop_instance_uid": tags.get("SOPInstanceUID"), "modality": tags.get("Modality"),
                        "series_instance_uid": tags.get("SeriesInstanceUID"),
                        "study_instance_uid": tags.get("StudyInstanceUID")})
        return out

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
