"""[tls] and destinations' tls key: validated like the rest of the config (one line naming the file
and the key; exit 2 from the CLI), with every certificate/key file loaded at start-up."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, settings_from_dict
from tests.helpers import REPO, TlsPki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TlsPki:
    return TlsPki(tmp_path_factory.mktemp("pki")).make()


def good(pki: TlsPki) -> dict:
    return {
        "node": {"ae_title": "CTQA", "port": 11112},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "destinations": [{"name": "PACS", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "tls": True}],
        "tls": {"port": 2762, "certificate": str(pki.cert("node")), "private_key": str(pki.key("node")),
                "ca_certificates": str(pki.ca)},
    }


def test_tls_section_parses_with_defaults(pki):
    s = settings_from_dict(good(pki), "site.toml")
    assert (s.tls.port, s.tls.require_client_certificate) == (2762, True)
    assert s.tls.certificate == str(pki.cert("node").resolve())
    assert s.destinations[0].tls is True
    # without [tls] and without tls destinations: no TLS at all, destinations default to plain
    data = good(pki)
    del data["tls"]
    del data["destinations"][0]["tls"]
    s = settings_from_dict(data, "site.toml")
    assert s.tls is None and s.destinations[0].tls is False


def test_relative_paths_resolve_against_the_working_directory(pki, monkeypatch):
    monkeypatch.chdir(pki.folder)
    data = good(pki)
    data["tls"].update(certificate="node.crt", private_key="node.key", ca_certificates="ca.crt")
    s = settings_from_dict(data, "site.toml")
    assert s.tls.private_key == str((pki.folder / "node.key").resolve())


def test_certificate_names_parse_and_default_to_none(pki):
    data = good(pki)
    data["scanners"].append({"name": "CT2", "ae_title": "CT2", "certificate_names": ["ct2.hospital.example", "10.1.2.3"]})
    s = settings_from_dict(data, "site.toml")
    assert [sc.certificate_names for sc in s.scanners] == [[], ["ct2.hospital.example", "10.1.2.3"]]


def test_plain_port_minus_one_means_tls_only(pki):
    data = good(pki)
    data["node"]["port"] = -1
    assert settings_from_dict(data, "site.toml").node.port == -1


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d, p: d["tls"].update(colour="red"), "site.toml: unknown key 'tls.colour'"),
        (lambda d, p: d["tls"].update(port="2762"), "site.toml: key 'tls.port' must be an integer"),
        (lambda d, p: d["tls"].update(port=70000), "key 'tls.port' must be a TCP port 1-65535"),
        (lambda d, p: d["tls"].update(port=11112), "key 'tls.port' must differ from 'node.port' (11112)"),
        (lambda d, p: d["tls"].update(require_client_certificate="yes"),
         "key 'tls.require_client_certificate' must be true or false"),
        (lambda d, p: d["tls"].pop("ca_certificates"), "missing required key 'tls.ca_certificates'"),
        (lambda d, p: d["tls"].update(certificate=str(p.folder / "absent.crt")),
         f"key 'tls.certificate' names '{{folder}}/absent.crt', which is not a readable file"),
        (lambda d, p: d["tls"].update(private_key=str(p.key("pacs"))),
         "key 'tls.private_key': cannot load the certificate and private key: the private key does not belong to "
         "the certificate"),
        (lambda d, p: d["tls"].update(private_key=str(p.cert("node"))),
         "key 'tls.private_key': {folder}/node.crt holds no PEM private key"),
        (lambda d, p: d["tls"].update(ca_certificates=str(p.key("node"))),
         "key 'tls.ca_certificates': {folder}/node.key holds no PEM certificate"),
        (lambda d, p: d["destinations"][0].update(tls="yes"), "key 'destinations[0].tls' must be true or false"),
        (lambda d, p: d.pop("tls"), "key 'destinations[0].tls' is true but there is no [tls] section"),
        (lambda d, p: (d.pop("tls"), d["destinations"][0].pop("tls"), d["node"].update(port=-1)),
         "key 'node.port' is -1 (no plain DICOM) but there is no [tls] port"),
        (lambda d, p: (d["tls"].pop("port"), d["node"].update(port=-1)),
         "key 'node.port' is -1 (no plain DICOM) but 'tls.port' is not set"),
        (lambda d, p: d["node"].update(port=-2), "key 'node.port' must be a TCP port"),
        (lambda d, p: d["scanners"][0].update(certificate_names="CT1"),
         "key 'scanners[0].certificate_names' must be a list"),
        (lambda d, p: d["scanners"][0].update(certificate_names=["CT1", " ct1"]),
         "key 'scanners[0].certificate_names[1]' must be a certificate name (subject CN, DNS name or IP address) "
         "without surrounding spaces, got ' ct1'"),
        (lambda d, p: (d["scanners"][0].update(certificate_names=["CT1"]), d["tls"].pop("port")),
         "key 'scanners[0].certificate_names' accepts that scanner only over DICOM TLS, but there is no [tls] port"),
    ],
)
def test_bad_tls_config_names_file_and_key(pki, mutate, expected):
    data = copy.deepcopy(good(pki))
    mutate(data, pki)
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(data, "site.toml")
    assert expected.format(folder=pki.folder) in str(exc.value)


def test_encrypted_private_key_is_refused_without_prompting(pki, tmp_path):
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.key("node")), "-aes256", "-passout", "pass:secret",
                    "-out", str(enc)], check=True, capture_output=True)
    data = good(pki)
    data["tls"]["private_key"] = str(enc)
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(data, "site.toml")
    assert f"key 'tls.private_key': {enc} is an encrypted private key" in str(exc.value)


def test_cli_exits_2_with_one_line_for_a_missing_certificate(pki, tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[node]\nport = -1\ndata_dir = "{tmp_path}/var"\ndatabase = "sqlite:///{tmp_path}/var/db.sqlite"\n'
                   f'[tls]\nport = 2762\ncertificate = "{tmp_path}/nope.crt"\nprivate_key = "{pki.key("node")}"\n'
                   f'ca_certificates = "{pki.ca}"\n')
    r = subprocess.run([sys.executable, "-m", "node", "--config", str(cfg), "serve"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert f"{cfg}: key 'tls.certificate' names '{tmp_path}/nope.crt', which is not a readable file" in lines[0]
    assert not (tmp_path / "var").exists()  # nothing created before the config is valid


def test_the_shipped_config_toml_tls_block_parses_when_uncommented(pki, tmp_path):
    """config.toml's commented [tls] block, uncommented with real files, is a valid configuration."""
    text = (REPO / "config.toml").read_text()
    start = text.index("# [tls]")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("# "):
            break
        block.append(line[2:])
    import tomllib

    tls = tomllib.loads("\n".join(block))["tls"]
    assert set(tls) == {"port", "certificate", "private_key", "ca_certificates", "require_client_certificate"}
    data = good(pki)
    data["tls"] = {**tls, "certificate": str(pki.cert("node")), "private_key": str(pki.key("node")),
                   "ca_certificates": str(pki.ca)}
    s = settings_from_dict(data, "config.toml")
    assert s.tls.port == tls["port"] and s.tls.require_client_certificate is True
