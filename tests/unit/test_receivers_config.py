"""node.receivers (receiving processes sharing the DICOM port): accepted values and the refusals."""

from __future__ import annotations

import copy

import pytest

from node.config import MAX_RECEIVERS, ConfigError, settings_from_dict

GOOD = {
    "node": {"ae_title": "CTQA", "host": "127.0.0.1", "port": 11112, "data_dir": "./var",
             "database": "sqlite:///./var/ctqa.sqlite", "stable_age_s": 30},
    "scanners": [{"name": "CT1", "ae_title": "CT1", "hosts": ["127.0.0.1"]}],
}


def _with(**node) -> dict:
    data = copy.deepcopy(GOOD)
    data["node"].update(node)
    return data


def test_default_is_one_process_and_several_are_accepted():
    assert settings_from_dict(GOOD, "site.toml").node.receivers == 1
    assert settings_from_dict(_with(receivers=4), "site.toml").node.receivers == 4
    assert settings_from_dict(_with(receivers=MAX_RECEIVERS), "site.toml").node.receivers == MAX_RECEIVERS


@pytest.mark.parametrize("value, expected", [
    (0, "key 'node.receivers' must be a whole number of receiving processes from 1 to 64 (1: the serve process alone), got 0"),
    (-2, "key 'node.receivers' must be a whole number of receiving processes from 1 to 64"),
    (MAX_RECEIVERS + 1, f"got {MAX_RECEIVERS + 1}"),
    ("2", "key 'node.receivers' must be an integer"),
    (2.5, "key 'node.receivers' must be an integer"),
])
def test_a_wrong_value_is_refused_naming_the_key(value, expected):
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(_with(receivers=value), "site.toml")
    assert str(exc.value).startswith("site.toml: ") and expected in str(exc.value)


def test_several_receivers_need_the_plain_port():
    data = _with(receivers=2, port=-1)
    data["tls"] = {"port": 2762, "certificate": "c.pem", "private_key": "k.pem", "ca_certificates": "ca.pem"}
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(data, "site.toml")
    assert "key 'node.receivers' = 2 needs the plain DICOM port" in str(exc.value)
