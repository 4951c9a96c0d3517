"""The config contract: every key checked, errors name the file, the key and what is expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings, settings_from_dict
from tests.helpers import REPO

GOOD = {
    "node": {"ae_title": "CTQA", "host": "127.0.0.1", "port": 11112, "data_dir": "./var",
             "database": "sqlite:///./var/ctqa.sqlite", "stable_age_s": 30},
    "scanners": [{"name": "CT1", "ae_title": "CT1", "hosts": ["127.0.0.1"]}],
    "destinations": [{"name": "PACS", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
    "analysis": {"device": "auto"},
}


def test_the_shipped_config_is_valid_and_matches_the_contract():
    s = load_settings(str(REPO / "config.toml"))
    assert s.node.ae_title == "CTQA" and s.node.port == 11112 and s.node.stable_age_s == 30.0
    assert s.node.database == "sqlite:///./var/ctqa.sqlite" and s.node.data_dir == "./var"
    assert [(x.name, x.ae_title, x.hosts) for x in s.scanners] == [("CT1", "CT1", ["127.0.0.1"])]
    assert s.analysis.device == "auto"


def test_contract_example_parses():
    s = settings_from_dict(GOOD, "site.toml")
    assert s.destinations[0].port == 4242 and s.scanner_by_ae("CT1").name == "CT1"
    assert s.scanner_by_ae("NOPE") is None


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["node"].update(colour="red"), "site.toml: unknown key 'node.colour'"),
        (lambda d: d["node"].update(port="11112"), "site.toml: key 'node.port' must be an integer"),
        (lambda d: d["node"].update(stable_age_s="soon"), "key 'node.stable_age_s' must be a number"),
        (lambda d: d["node"].update(port=70000), "key 'node.port' must be a TCP port"),
        (lambda d: d["node"].update(ae_title="THIS_AE_TITLE_IS_TOO_LONG"), "key 'node.ae_title' must be a DICOM AE title"),
        (lambda d: d["scanners"][0].pop("ae_title"), "missing required key 'scanners[0].ae_title'"),
        (lambda d: d["scanners"][0].update(hosts="127.0.0.1"), "key 'scanners[0].hosts' must be a list of strings"),
        (lambda d: d["scanners"][0].update(hosts=["ct1.example"]), "key 'scanners[0].hosts[0]' must be an IP address"),
        (lambda d: d["destinations"][0].pop("port"), "missing required key 'destinations[0].port'"),
        (lambda d: d["analysis"].update(device="gpu"), "key 'analysis.device' must be one of auto, cpu, cuda"),
        (lambda d: d["analysis"].update(models=["basic", "magic"]), "names unknown model 'magic'"),
        (lambda d: d.update(nodes={}), "unknown section or key 'nodes'"),
        (lambda d: d.pop("node"), "missing required section '[node]'"),
        (lambda d: d["scanners"].append({"name": "CT1", "ae_title": "CT9"}), "repeats the scanner name 'CT1'"),
    ],
)
def test_bad_config_names_file_key_and_expectation(mutate, expected):
    import copy

    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(data, "site.toml")
    assert expected in str(exc.value)


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "CTQA"\nport = "eleven"\n')
    r = run_cli("--config", str(bad), "status")
    assert r.returncode == 2
    assert f"{bad}: key 'node.port' must be an integer" in r.stderr
    assert "Traceback" not in r.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    r = run_cli("--config", str(broken), "serve")
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--config", str(tmp_path / "missing.toml"), "serve")
    assert r.returncode == 2 and "configuration file not found" in r.stderr


def test_config_lookup_order_flag_then_env_then_cwd(tmp_path):
    import os

    env_cfg = tmp_path / "env.toml"
    env_cfg.write_text('[node]\nbogus_env_key = 1\n')
    cwd_cfg = tmp_path / "config.toml"
    cwd_cfg.write_text('[node]\nbogus_cwd_key = 1\n')
    flag_cfg = tmp_path / "flag.toml"
    flag_cfg.write_text('[node]\nbogus_flag_key = 1\n')
    env = dict(os.environ, CTQA_CONFIG=str(env_cfg), PYTHONPATH=str(REPO))
    assert "bogus_flag_key" in run_cli("--config", str(flag_cfg), "status", cwd=tmp_path, env=env).stderr
    assert "bogus_env_key" in run_cli("status", cwd=tmp_path, env=env).stderr
    env.pop("CTQA_CONFIG")
    assert "bogus_cwd_key" in run_cli("status", cwd=tmp_path, env=env).stderr
