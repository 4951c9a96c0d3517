"""config.toml -> frozen, typed settings.

Every section is a frozen dataclass. Loading rejects unknown keys, wrong types and missing required
keys with a ``ConfigError`` that names the file, the key and what is expected; the CLI prints that
message and exits 2 (never a traceback). Relative paths in ``data_dir`` and in a ``sqlite:///``
database URL are resolved against the directory the process runs in, as the README says.

Resolution of the file: ``--config`` flag > ``CTQA_CONFIG`` environment variable > ``./config.toml``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_VAR = "CTQA_CONFIG"
DEFAULT_FILE = "config.toml"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control


class ConfigError(ValueError):
    """A problem in the configuration file, phrased for the person who edits it."""


MAX_RECEIVERS = 64


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "CTQA"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: str = "./var"
    database: str = "sqlite:///./var/ctqa.sqlite"
    stable_age_s: float = 30.0
    max_pdu: int = 1048576
    max_associations: int = 10
    max_instance_mb: int = 2048  # one instance's dataset (inflated, for Deflated) at most this many MiB
    receivers: int = 1  # processes receiving on node.port (the serve process and receivers - 1 more)
    log_level: str = "INFO"


@dataclass(frozen=True)
class ScannerSettings:
    name: str
    ae_title: str
    hosts: list[str] = field(default_factory=list)
    # names the scanner's TLS client certificate must carry (subject CN or a subjectAltName DNS/IP
    # entry); when set, the scanner is accepted only over DICOM TLS with such a certificate
    certificate_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DestinationSettings:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False  # DICOM TLS with the [tls] certificate; the PACS's certificate checked against its CA


@dataclass(frozen=True)
class TlsSettings:
    """[tls]: DICOM TLS (PS3.15 Annex B) for the SCP's TLS listener and for destinations with tls = true."""

    certificate: str  # PEM: the node's certificate (server and client), optionally followed by intermediates
    private_key: str  # PEM, unencrypted
    ca_certificates: str  # PEM: the CA(s) that sign the scanners' and the PACS's certificates
    port: int = -1  # TLS listener port; -1 = no TLS listener (TLS only towards destinations)
    require_client_certificate: bool = True


def _default_models() -> list[str]:
    from analysis.models import default_models

    return list(default_models())


SERIES_BATCH_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class AnalysisSettings:
    """[analysis] and one table [analysis.<model>] per model (its spec's options dataclass)."""

    device: str = "auto"
    models: list[str] = field(default_factory=_default_models)
    workers: int = 1  # analysis worker processes of `serve` (0: serve only receives and sends)
    torch_threads: int = 0  # 0 = torch's default (the CPU cores available to the process)
    lease_s: float = 120.0  # a running job's lease, renewed by its live worker; then claimed again
    backlog_warn_s: float = 3600.0  # the oldest waiting job this old: one WARNING and an alert; 0 = off
    # several short series in one pass of the learned models: auto = on only on CUDA (docs/series_batching.md)
    series_batch: str = "auto"
    # model name -> its options (analysis.models.<name>.Options); every model has an entry
    model_options: dict[str, Any] = field(default_factory=dict, metadata={"toml": False})

    def options(self, name: str):
        if name in self.model_options:
            return self.model_options[name]
        from analysis.models import default_options

        return default_options(name)


@dataclass(frozen=True)
class OutboxSettings:
    retry_initial_s: float = 30.0
    retry_max_s: float = 3600.0
    give_up_after_s: float = 7 * 24 * 3600.0
    poll_s: float = 5.0


@dataclass(frozen=True)
class Settings:
    file: str
    node: NodeSettings
    scanners: list[ScannerSettings]
    destinations: list[DestinationSettings]
    analysis: AnalysisSettings
    outbox: OutboxSettings
    extra: dict[str, Any] = field(default_factory=dict)  # validated sections owned by other packages
    tls: TlsSettings | None = None
    selection: tuple = ()  # [[selection]] rules (analysis.selection.Rule), in file order

    @property
    def selection_policy(self):
        """Which models analyse which series: the [[selection]] rules, then the defaults."""
        from analysis.selection import SelectionPolicy

        return SelectionPolicy(tuple(self.selection))

    @property
    def reporting(self):
        """[trends], [alerts] and [reports] as reports.trend_settings.ReportingSettings."""
        from reports.trend_settings import ReportingSettings

        return ReportingSettings.from_sections(self.extra)

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir)

    def scanner_by_ae(self, ae_title: str) -> ScannerSettings | None:
        for s in self.scanners:
            if s.ae_title == ae_title:
                return s
        return None

    def scanner_by_name(self, name: str) -> ScannerSettings | None:
        for s in self.scanners:
            if s.name == name:
                return s
        return None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner).removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_NAMES.get(tp, str(tp))


def _check_value(value: Any, tp: Any, file: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        # "int | None": the key may be left out (None, e.g. a per-device default); TOML has no null,
        # so a value that is written must be of the other type
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_value(value, inner, file, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{file}: key '{key}' must be {_describe(tp)}, got {value!r}")
        return [_check_value(v, inner, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{file}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{file}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r}")  # programming error, not user input


def _build(cls: type, data: Any, file: str, section: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: '{section}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{file}: unknown key '{section}.{unknown[0]}'; expected one of: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], file, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{file}: missing required key '{key}' ({_describe(hints[name])})")
    return cls(**kwargs)


def _validate_ae(value: str, file: str, key: str) -> None:
    if not _AE_RE.match(value) or value.strip() == "":
        raise ConfigError(
            f"{file}: key '{key}' must be a DICOM AE title (1-16 printable characters, no backslash), got {value!r}"
        )


def _validate_port(value: int, file: str, key: str, allow_zero: bool = False) -> None:
    if not ((allow_zero and value == 0) or 1 <= value <= 65535):
        raise ConfigError(f"{file}: key '{key}' must be a TCP port 1-65535, got {value}")


# Sections owned by other packages register a validator here: name -> callable(section_dict, file).
SECTION_VALIDATORS: dict[str, typing.Callable[[Any, str], Any]] = {}


def _register_optional_sections() -> None:
    """Sections validated by the reports package: [trends], [alerts], [reports]."""
    from reports.trend_settings import SECTION_VALIDATORS as validators
    from reports.trend_settings import TrendConfigError

    def wrap(fn):
        def validate(section, file):
            try:
                return fn(section, file)
            except TrendConfigError as exc:
                raise ConfigError(str(exc)) from None

        return validate

    for name, fn in validators.items():
        SECTION_VALIDATORS[name] = wrap(fn)


def parse_settings(data: dict, file: str) -> Settings:
    import node.catalogue  # noqa: F401  (the model specs' codes: [trends] defaults depend on them)

    _register_optional_sections()
    known = {"node", "scanners", "destinations", "analysis", "outbox", "tls", "selection", *SECTION_VALIDATORS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{file}: unknown section or key '{unknown[0]}'; expected one of: {', '.join(sorted(known))}")
    if "node" not in data:
        raise ConfigError(f"{file}: missing required section '[node]'")
    node = _build(NodeSettings, data["node"], file, "node")
    _validate_ae(node.ae_title, file, "node.ae_title")
    if node.port != -1:  # -1: no plain DICOM listener (TLS only; checked with [tls] below)
        _validate_port(node.port, file, "node.port", allow_zero=True)
    if node.stable_age_s <= 0:
        raise ConfigError(f"{file}: key 'node.stable_age_s' must be > 0 seconds, got {node.stable_age_s}")
    if node.max_pdu < 0:
        raise ConfigError(f"{file}: key 'node.max_pdu' must be >= 0 bytes (0 = unlimited), got {node.max_pdu}")
    if node.max_instance_mb < 1:
        raise ConfigError(f"{file}: key 'node.max_instance_mb' must be >= 1 MiB, got {node.max_instance_mb}")
    if not 1 <= node.receivers <= MAX_RECEIVERS:
        raise ConfigError(f"{file}: key 'node.receivers' must be a whole number of receiving processes from 1 "
                          f"to {MAX_RECEIVERS} (1: the serve process alone), got {node.receivers}")
    if node.receivers > 1 and node.port == -1:
        raise ConfigError(f"{file}: key 'node.receivers' = {node.receivers} needs the plain DICOM port "
                          f"(node.port is -1): the TLS port is served by the serve process alone")
    if node.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{file}: key 'node.log_level' must be DEBUG, INFO, WARNING or ERROR, got {node.log_level!r}")
    if "://" not in node.database:
        raise ConfigError(f"{file}: key 'node.database' must be an SQLAlchemy URL such as sqlite:///./var/ctqa.sqlite, got {node.database!r}")

    raw_scanners = data.get("scanners", [])
    if not isinstance(raw_scanners, list):
        raise ConfigError(f"{file}: 'scanners' must be an array of tables ([[scanners]]), got {raw_scanners!r}")
    scanners = [_build(ScannerSettings, s, file, f"scanners[{i}]") for i, s in enumerate(raw_scanners)]
    seen_names: set[str] = set()
    seen_aes: set[str] = set()
    for i, s in enumerate(scanners):
        _validate_ae(s.ae_title, file, f"scanners[{i}].ae_title")
        if not s.name.strip():
            raise ConfigError(f"{file}: key 'scanners[{i}].name' must not be empty")
        if s.name in seen_names:
            raise ConfigError(f"{file}: key 'scanners[{i}].name' repeats the scanner name {s.name!r}; names must be unique")
        if s.ae_title in seen_aes:
            raise ConfigError(f"{file}: key 'scanners[{i}].ae_title' repeats the AE title {s.ae_title!r}; AE titles must be unique")
        seen_names.add(s.name)
        seen_aes.add(s.ae_title)
        for j, h in enumerate(s.hosts):
            try:
                ipaddress.ip_address(h)
            except ValueError:
                raise ConfigError(
                    f"{file}: key 'scanners[{i}].hosts[{j}]' must be an IP address such as 127.0.0.1, got {h!r}"
                ) from None
        for j, cn in enumerate(s.certificate_names):
            if not cn.strip() or cn != cn.strip():
                raise ConfigError(f"{file}: key 'scanners[{i}].certificate_names[{j}]' must be a certificate name "
                                  f"(subject CN, DNS name or IP address) without surrounding spaces, got {cn!r}")

    raw_dest = data.get("destinations", [])
    if not isinstance(raw_dest, list):
        raise ConfigError(f"{file}: 'destinations' must be an array of tables ([[destinations]]), got {raw_dest!r}")
    destinations = [_build(DestinationSettings, d, file, f"destinations[{i}]") for i, d in enumerate(raw_dest)]
    dest_names: set[str] = set()
    for i, d in enumerate(destinations):
        _validate_ae(d.ae_title, file, f"destinations[{i}].ae_title")
        _validate_port(d.port, file, f"destinations[{i}].port")
        if d.name in dest_names:
            raise ConfigError(f"{file}: key 'destinations[{i}].name' repeats {d.name!r}; names must be unique")
        dest_names.add(d.name)

    analysis = _parse_analysis(data.get("analysis", {}), file)

    tls = _parse_tls(data, file, node, destinations)
    bound = next((i for i, s in enumerate(scanners) if s.certificate_names), None)
    if bound is not None and (tls is None or tls.port == -1):
        raise ConfigError(f"{file}: key 'scanners[{bound}].certificate_names' accepts that scanner only over DICOM TLS, "
                          "but there is no [tls] port: it could never connect")

    outbox = _build(OutboxSettings, data.get("outbox", {}), file, "outbox")
    if not 0 < outbox.retry_initial_s <= outbox.retry_max_s:
        raise ConfigError(f"{file}: keys 'outbox.retry_initial_s' and 'outbox.retry_max_s' must satisfy 0 < initial <= max")

    selection = _parse_selection(data.get("selection", []), file)

    extra = {name: fn(data[name], file) for name, fn in SECTION_VALIDATORS.items() if name in data}
    return Settings(file, node, scanners, destinations, analysis, outbox, extra, tls=tls, selection=selection)


def _parse_selection(raw: Any, file: str) -> tuple:
    """[[selection]] rules (analysis.selection): unknown key, wrong type, unknown model -> one line."""
    from analysis import models as registry
    from analysis.selection import SelectionError, parse_rules

    try:
        return parse_rules(raw, registry.specs())
    except SelectionError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def _parse_analysis(raw: Any, file: str) -> AnalysisSettings:
    """[analysis] plus [analysis.<model>] tables, one per model spec (analysis.models): each table is
    that model's options dataclass, validated like every other section. Keys that moved from
    [analysis] into a model's table get a one-line migration error."""
    from analysis import models as registry

    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: 'analysis' must be a table, got {raw!r}")
    specs = registry.specs()
    flat = {k: v for k, v in raw.items() if k not in specs}
    for key in flat:
        for spec in specs.values():
            if key in spec.moved_keys:
                raise ConfigError(f"{file}: key 'analysis.{key}' has moved: write it as [analysis.{spec.name}] "
                                  f"{spec.moved_keys[key]} = {flat[key]!r}")
    allowed = {f.name for f in dataclasses.fields(AnalysisSettings) if f.metadata.get("toml", True)}
    unknown = sorted(set(flat) - allowed)
    if unknown:
        raise ConfigError(f"{file}: unknown key 'analysis.{unknown[0]}'; expected one of: {', '.join(sorted(allowed))}, "
                          f"or a model table [analysis.<model>] ({', '.join(specs)})")
    analysis = _build(AnalysisSettings, flat, file, "analysis")
    if analysis.device not in {"auto", "cpu", "cuda"}:
        raise ConfigError(f"{file}: key 'analysis.device' must be one of auto, cpu, cuda, got {analysis.device!r}")
    if analysis.series_batch not in SERIES_BATCH_MODES:
        raise ConfigError(f"{file}: key 'analysis.series_batch' must be one of {', '.join(SERIES_BATCH_MODES)}, "
                          f"got {analysis.series_batch!r}")
    for m in analysis.models:
        if m not in specs:
            raise ConfigError(
                f"{file}: key 'analysis.models' names unknown model {m!r}; known: {', '.join(specs)}"
            )
    if analysis.workers < 0:
        raise ConfigError(f"{file}: key 'analysis.workers' must be >= 0 (0 = this node only receives and sends), "
                          f"got {analysis.workers}")
    if not analysis.lease_s >= 3:
        raise ConfigError(f"{file}: key 'analysis.lease_s' must be >= 3 seconds, got {analysis.lease_s}")
    if not analysis.backlog_warn_s >= 0:
        raise ConfigError(f"{file}: key 'analysis.backlog_warn_s' must be >= 0 (0 = no backlog warning), "
                          f"got {analysis.backlog_warn_s}")
    if analysis.torch_threads < 0:
        raise ConfigError(f"{file}: key 'analysis.torch_threads' must be >= 0 (0 = torch's default), "
                          f"got {analysis.torch_threads}")
    options = {}
    for name, spec in specs.items():
        section = f"analysis.{name}"
        table = raw.get(name, {})
        if spec.options is registry.spec.NoOptions and table and isinstance(table, dict):
            raise ConfigError(f"{file}: unknown key '{section}.{sorted(table)[0]}'; the model {name} has no options")
        for old, new in getattr(spec.options, "RENAMED_KEYS", {}).items():  # a key renamed inside the table
            if isinstance(table, dict) and old in table:
                raise ConfigError(f"{file}: key '{section}.{old}' was renamed: write it as [{section}] {new} = ... "
                                  f"(see config.toml), or leave it out for the default")
        opts = _build(spec.options, table, file, section)
        try:
            validate = getattr(opts, "validate", None)
            if validate is not None:
                validate()
        except ValueError as exc:  # "key 'trials' must be >= 1, got 0"
            raise ConfigError(f"{file}: {str(exc).replace(chr(39), chr(39) + section + '.', 1)}") from None
        options[name] = opts
    return dataclasses.replace(analysis, model_options=options)


def _parse_tls(data: dict, file: str, node: NodeSettings, destinations: list[DestinationSettings]) -> TlsSettings | None:
    """[tls]: every file must exist and load (a certificate with its key, the CA file); a destination
    with tls = true needs the section; node.port = -1 needs a TLS listener."""
    tls = _build(TlsSettings, data["tls"], file, "tls") if "tls" in data else None
    tls_dest = next((i for i, d in enumerate(destinations) if d.tls), None)
    if tls is None:
        if tls_dest is not None:
            raise ConfigError(f"{file}: key 'destinations[{tls_dest}].tls' is true but there is no [tls] section "
                              "(certificate, private_key, ca_certificates)")
        if node.port == -1:
            raise ConfigError(f"{file}: key 'node.port' is -1 (no plain DICOM) but there is no [tls] port: "
                              "the node would not listen at all")
        return None
    if tls.port != -1:
        _validate_port(tls.port, file, "tls.port")
        if tls.port == node.port:
            raise ConfigError(f"{file}: key 'tls.port' must differ from 'node.port' ({node.port})")
    elif node.port == -1:
        raise ConfigError(f"{file}: key 'node.port' is -1 (no plain DICOM) but 'tls.port' is not set: "
                          "the node would not listen at all")
    resolved = {}
    for key in ("certificate", "private_key", "ca_certificates"):
        path = Path(getattr(tls, key))
        if not path.is_file():
            raise ConfigError(f"{file}: key 'tls.{key}' names {str(path)!r}, which is not a readable file")
        resolved[key] = str(path.resolve())
    tls = dataclasses.replace(tls, **resolved)
    from scp.tls import TlsSetupError, client_context, server_context

    try:
        server_context(tls.certificate, tls.private_key, tls.ca_certificates, tls.require_client_certificate)
        client_context(tls.certificate, tls.private_key, tls.ca_certificates)
    except TlsSetupError as exc:
        raise ConfigError(f"{file}: key '{exc.key}': {exc}") from None
    return tls


def resolve_config_path(flag: str | None) -> Path:
    if flag:
        return Path(flag)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(DEFAULT_FILE)


def load_settings(flag: str | None = None) -> Settings:
    path = resolve_config_path(flag)
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: configuration file not found (give --config FILE or set {ENV_VAR}; an example is config.toml in the project)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_settings(data, file)


def settings_from_dict(data: dict, file: str = "<dict>") -> Settings:
    """For tests and programmatic use: the same validation as a file."""
    return parse_settings(data, file)

