"""DICOM TLS (PS3.15 Annex B) against real peers: DCMTK storescu +tls pushing to the node's TLS
listener, and the outbox delivering to an Orthanc with DICOM TLS enabled. A throwaway PKI (two CAs)
is made with openssl per module."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pydicom
import pytest

from node.orthanc import LocalOrthanc
from tests.helpers import (
    PHANTOM_5MM,
    NodeProcess,
    TlsPki,
    free_port,
    node_sql,
    pacs_destination,
    qa_node,
    require,
    require_tool,
    storescu,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TlsPki:
    return TlsPki(tmp_path_factory.mktemp("pki")).make()


def slices(n: int):
    folder = require(PHANTOM_5MM)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "LICENSE")[:n]


def tls_node(tmp_path, pki: TlsPki, *, require_client_certificate: bool = True, extra: str = "",
             plain: bool = False, scanners: str | None = None) -> NodeProcess:
    """A node listening for DICOM TLS only (node.port = -1), or beside a plain port."""
    tls_port = free_port()
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", port=0 if plain else -1,
                       scanners=scanners,
                       extra=extra + "\n" + pki.tls_section(tls_port, require_client_certificate))
    node = NodeProcess(cfg, tmp_path)
    node.tls_port = tls_port
    return node


def push_tls(port: int, files, key=None, cert=None, ca=None, calling: str = "CT1", anonymous: bool = False):
    tls = ["+tla"] if anonymous else ["+tls", str(key), str(cert)]
    return storescu(port, *files, calling=calling, extra=(*tls, "+cf", str(ca), "-to", "20"))


def stored(node: NodeProcess) -> int:
    return len(list((node.workdir / "var" / "store").rglob("*.dcm")))


def test_scanner_with_site_certificate_is_stored_others_are_refused(tmp_path, pki):
    require_tool("storescu")
    files = slices(3)
    node = tls_node(tmp_path, pki)
    port = node.start()
    try:
        assert port == node.tls_port  # no plain listener: the port file names the TLS port
        # the README's check from another machine: echoscu with the scanner's certificate
        echo = subprocess.run([require_tool("echoscu"), "+tls", str(pki.key("scanner")), str(pki.cert("scanner")),
                               "+cf", str(pki.ca), "-aet", "CT1", "-aec", "CTQA", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
        # a scanner certificate signed by the configured CA: stored
        r = push_tls(port, files, pki.key("scanner"), pki.cert("scanner"), pki.ca)
        assert r.returncode == 0, r.stderr
        assert stored(node) == 3
        # no client certificate (anonymous TLS): refused at the handshake
        r = push_tls(port, files, ca=pki.ca, anonymous=True)
        assert r.returncode != 0
        # a certificate from another CA: refused
        r = push_tls(port, files, pki.key("stranger"), pki.cert("stranger"), pki.ca)
        assert r.returncode != 0
        # plain DICOM to the TLS port: refused
        r = storescu(port, *files, extra=("-to", "20"))
        assert r.returncode != 0
        # a scanner that does not trust the node's certificate gives up on its own side
        r = push_tls(port, files, pki.key("scanner"), pki.cert("scanner"), pki.other_ca)
        assert r.returncode != 0
        # the allow list still applies on the TLS port: good certificate, unknown calling AE title
        r = push_tls(port, files, pki.key("scanner"), pki.cert("scanner"), pki.ca, calling="CT9")
        assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
        assert stored(node) == 3  # nothing from any refused peer
        log = node.log()
        assert "listening for DICOM TLS on 127.0.0.1:%d (client certificate required)" % port in log
        assert "TLS connection from 127.0.0.1 refused: the peer sent no client certificate" in log
        assert "TLS connection from 127.0.0.1 refused: certificate not accepted: unable to get local issuer certificate" in log
        assert "TLS connection from 127.0.0.1 refused: not a TLS connection (plain DICOM on the TLS port?)" in log
        assert "association rejected: unknown calling AE title (calling AE 'CT9' from 127.0.0.1)" in log
        assert "Traceback" not in log
        # and the node still serves a good scanner afterwards
        r = push_tls(port, slices(4)[3:], pki.key("scanner"), pki.cert("scanner"), pki.ca)
        assert r.returncode == 0, r.stderr
        assert stored(node) == 4
    finally:
        node.stop()


def test_a_silent_connection_does_not_hold_up_the_tls_listener(tmp_path, pki):
    require_tool("storescu")
    node = tls_node(tmp_path, pki, plain=True)
    plain_port = node.start()
    try:
        assert plain_port != node.tls_port
        idle = [socket.create_connection(("127.0.0.1", node.tls_port)) for _ in range(3)]  # say nothing
        try:
            started = time.monotonic()
            r = push_tls(node.tls_port, slices(1), pki.key("scanner"), pki.cert("scanner"), pki.ca)
            assert r.returncode == 0, r.stderr
            assert time.monotonic() - started < 15  # not queued behind the idle handshakes (30 s each)
        finally:
            for s in idle:
                s.close()
        # the plain port beside it still takes plain DICOM
        r = storescu(plain_port, *slices(2)[1:])
        assert r.returncode == 0, r.stderr
        assert stored(node) == 2
    finally:
        node.stop()


def test_optional_client_certificate_admits_anonymous_tls_but_not_a_foreign_ca(tmp_path, pki):
    require_tool("storescu")
    node = tls_node(tmp_path, pki, require_client_certificate=False)
    port = node.start()
    try:
        r = push_tls(port, slices(1), ca=pki.ca, anonymous=True)
        assert r.returncode == 0, r.stderr
        r = push_tls(port, slices(2)[1:], pki.key("stranger"), pki.cert("stranger"), pki.ca)
        assert r.returncode != 0  # a certificate that is presented is still verified
        assert stored(node) == 1
        assert "(client certificate optional)" in node.log()
    finally:
        node.stop()


BOUND_SCANNERS = """
[[scanners]]
name = "CT1"
ae_title = "CT1"
certificate_names = ["scanner"]

[[scanners]]
name = "CT2"
ae_title = "CT2"
certificate_names = ["127.0.0.1"]

[[scanners]]
name = "CT3"
ae_title = "CT3"
"""


def test_certificate_names_bind_a_scanner_to_its_certificate(tmp_path, pki):
    """CT1 must present a certificate naming "scanner" (the test PKI's scanner leaf: CN=scanner), CT2
    one naming 127.0.0.1 (a subjectAltName IP entry), both over TLS only; CT3 is not bound. "wrongname"
    is signed by the same CA but names only itself and elsewhere.example."""
    require_tool("storescu")
    node = tls_node(tmp_path, pki, plain=True, require_client_certificate=False, scanners=BOUND_SCANNERS)
    plain_port = node.start()
    tls_port = node.tls_port
    good, wrong = (pki.key("scanner"), pki.cert("scanner")), (pki.key("wrongname"), pki.cert("wrongname"))
    files = slices(6)
    try:
        assert push_tls(tls_port, files[:1], *good, pki.ca, calling="CT1").returncode == 0
        assert push_tls(tls_port, files[1:2], *good, pki.ca, calling="CT2").returncode == 0  # by IP address
        assert push_tls(tls_port, files[2:3], *wrong, pki.ca, calling="CT3").returncode == 0  # unbound: any CA cert
        assert storescu(plain_port, files[3], calling="CT3").returncode == 0  # unbound: plain DICOM too
        assert stored(node) == 4

        refused = [push_tls(tls_port, files[4:], *wrong, pki.ca, calling="CT1"),   # CA-signed, wrong name
                   push_tls(tls_port, files[4:], *wrong, pki.ca, calling="CT2"),
                   push_tls(tls_port, files[4:], ca=pki.ca, anonymous=True, calling="CT1"),  # no certificate
                   storescu(plain_port, *files[4:], calling="CT1", extra=("-to", "20"))]     # plain DICOM
        for r in refused:
            assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr, r.stderr
        assert stored(node) == 4
        log = node.log()
        assert ("association rejected: client certificate names wrongname, elsewhere.example, none of this "
                "scanner's certificate_names (calling AE 'CT1' from 127.0.0.1)") in log
        assert "none of this scanner's certificate_names (calling AE 'CT2' from 127.0.0.1)" in log
        assert ("association rejected: this scanner must present a client certificate naming it "
                "(certificate_names is set) (calling AE 'CT1' from 127.0.0.1)") in log
        assert ("association rejected: this scanner is accepted only over DICOM TLS (certificate_names is set) "
                "(calling AE 'CT1' from 127.0.0.1)") in log
        assert "Traceback" not in log
    finally:
        node.stop()


def outbox(node: NodeProcess) -> list[dict]:
    r = qa_node("--config", str(node.config), "outbox", "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_outbox_delivers_to_orthanc_over_dicom_tls(tmp_path, pki):
    require_tool("Orthanc")
    require_tool("storescu")
    series = require(PHANTOM_5MM)
    tls = {"certificate": pki.cert("pacs"), "private_key": pki.key("pacs"), "trusted_certificates": pki.ca,
           "remote_certificate_required": True}
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc", tls=tls) as pacs:
        node = tls_node(tmp_path, pki, extra=pacs_destination(pacs.dicom_port, tls=True))
        port = node.start()
        try:
            # the scanner pushes over TLS; the results leave over TLS
            r = push_tls(port, [series], pki.key("scanner"), pki.cert("scanner"), pki.ca)
            assert r.returncode == 0, r.stderr
            wait_until(lambda: (d := node_sql(node, "SELECT state FROM deliveries")) and len(d) >= 2
                       and all(st == "sent" for (st,) in d), timeout=240, interval=0.5,
                       what="delivery to Orthanc over TLS")
            rows = outbox(node)
            assert len(rows) >= 2 and all(x["state"] == "sent" for x in rows)
            study = str(pydicom.dcmread(slices(1)[0], stop_before_pixels=True).StudyInstanceUID)
            found = pacs.instances_in_study(study)
            assert sorted(i["sop_instance_uid"] for i in found) == sorted(x["sop_instance_uid"] for x in rows)
            assert pacs.get("/statistics")["CountInstances"] == len(rows)
            assert all(x["attempts"] == 1 for x in rows)
        finally:
            node.stop()
        # the same PACS seen without TLS, or with a CA that did not sign its certificate: the
        # deliveries stay pending (retried), with the reason
        from scp.sender import Destination, run_outbox
        from scp.tls import client_context
        from storage.db import Database
        from storage.filestore import FileStore
        from storage.outbox import RetryPolicy, list_deliveries
        from tests.helpers import queue_outbox_objects

        store = FileStore(tmp_path / "var2")
        store.prepare()
        db = Database(f"sqlite:///{tmp_path / 'var2' / 'db.sqlite'}")
        db.create_all()
        queue_outbox_objects(db, store, 2, ["WRONGCA", "PLAIN"])
        wrong_ca = client_context(str(pki.cert("node")), str(pki.key("node")), str(pki.other_ca))
        counts = run_outbox(db, store, calling_ae="CTQA", policy=RetryPolicy(),
                            destinations=[Destination("WRONGCA", "ORTHANC", "127.0.0.1", pacs.dicom_port, wrong_ca),
                                          Destination("PLAIN", "ORTHANC", "127.0.0.1", pacs.dicom_port)],
                            timeout_s=10)
        assert counts["sent"] == 0 and counts["retry"] == 4
        rows = list_deliveries(db)
        assert {r["state"] for r in rows} == {"pending"}
        errors = {r["destination"]: r["last_error"] for r in rows}
        assert errors["WRONGCA"].startswith(f"TLS: the certificate of 127.0.0.1:{pacs.dicom_port} is not accepted")
        assert errors["PLAIN"].startswith(f"cannot connect to 127.0.0.1:{pacs.dicom_port}: the peer closed the "
                                          "connection")
        assert errors["PLAIN"].endswith("; a DICOM TLS port? (set tls = true for this destination)")
        db.dispose()
