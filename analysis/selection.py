"""Series selection: which models analyse which series.

``[[selection]]`` rules in config.toml (validated by ``parse_rules``; node.config turns a problem into
one ConfigError line) and the built-in defaults decide, per model, whether a loaded series is
analysed. Every decision names the rule that made it and why, so that ``qa-node status`` and
``qa-node analyze --json`` can say it.

A rule::

    [[selection]]
    name = "thin head"                 # required, unique: named in every decision it makes
    models = ["n2q", "d2iqa"]          # the models it applies to (default: every model)
    action = "analyse"                 # or "skip"
    scanner = ["CT1", "CT*"]           # scanner names from [[scanners]] (glob)
    image_type = ['ORIGINAL\\PRIMARY\\AXIAL']   # ImageType, value by value (glob per value)
    slice_thickness_mm = [0.5, 2.0]    # inclusive range
    rows = [512, 512]                  # inclusive ranges of the matrix
    columns = [512, 512]
    min_slices = 20
    kernel = ["UB", "B3*"]             # ConvolutionKernel (glob, any of its values)
    protocol = ["*HEAD*"]              # ProtocolName (glob)
    series_description = ["*BRAIN*"]   # SeriesDescription (glob)
    body_part = ["HEAD", "BRAIN"]      # BodyPartExamined (glob)

Patterns are shell-style globs (``*``, ``?``, ``[...]``), case-insensitive, matched against the whole
value: a deliberate choice over regular expressions, which an operator would have to escape. An
ImageType pattern is matched value by value (``ORIGINAL\\PRIMARY\\*``); a pattern with fewer values
than the series' ImageType matches its leading values, so ``ORIGINAL\\PRIMARY\\AXIAL`` also matches
Siemens' ``ORIGINAL\\PRIMARY\\AXIAL\\CT_SOM5 SPI``. Within one key any listed pattern may match; all keys
given must match (a series without the attribute a key tests does not match it).

For each model, the first rule (in file order) that applies to the model and matches the series
decides (``analyse`` or ``skip``). When no rule matches and some ``analyse`` rule applies to the
model, the model skips the series (an ``analyse`` rule is a whitelist). Otherwise the defaults decide:

- dose screens (a CT-class image of the dose report: ImageType ``SCREEN SAVE``/``DOSE_INFO`` or a
  description/protocol such as "Dose Report"): no model, not even ``basic``;
- duplicate reconstructions (a series of the same study already analysed, or being analysed, with
  the same ImageType, kernel, slice thickness, pixel spacing, matrix, slice count and z range: the
  same images sent again under a new Series Instance UID; the node decides which series analyses
  it with an atomic claim in its database, ``storage.repo.claim_reconstruction``): no model;
- derived/secondary reformats (ImageType ``DERIVED\\SECONDARY``, or a value MPR, MIP, MINIP,
  REFORMATTED, PROJECTION IMAGE, CURVED, VOLUME_RENDERING): ``basic`` only;
- anything else: every model.

Localizers and non-axial series never reach the rules: ``analysis.volume.load_series`` skips them
(a series of a CT class whose ImageType says LOCALIZER, or whose slice normal is more than 45
degrees off the patient z axis), as it does files that are not CT images.

A series on which selection leaves no model but ``basic`` (when more were asked) is reported
``skipped`` with the reason; its basic statistics are still stored and its trend row recorded.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ANALYSE = "analyse"
SKIP = "skip"
BASIC = "basic"

# ImageType values (3rd and later) that mark a reformat or projection, not the acquired slices
REFORMAT_VALUES = frozenset({"MPR", "MIP", "MINIP", "MNIP", "REFORMATTED", "PROJECTION IMAGE", "CURVED",
                             "CPR", "VOLUME_RENDERING", "VOLUME RENDERING", "VRT", "3D"})
DOSE_IMAGE_TYPE_VALUES = frozenset({"SCREEN SAVE", "DOSE_INFO", "DOSE INFO", "DOSE REPORT", "DOSE_REPORT"})
DOSE_DESCRIPTIONS = ("*dose report*", "*dose info*", "*dose summary*", "*dose record*", "*patient protocol*",
                     "*dosereport*")

_RANGE_KEYS = {"slice_thickness_mm": "slice thickness", "rows": "rows", "columns": "columns"}
_PATTERN_KEYS = {"scanner": "scanner", "kernel": "ConvolutionKernel", "protocol": "ProtocolName",
                 "series_description": "SeriesDescription", "body_part": "BodyPartExamined"}
RULE_KEYS = ("name", "models", "action", "include", "image_type", "min_slices", *_RANGE_KEYS, *_PATTERN_KEYS)
# what an analyse rule's ``include`` may ask for: the default categories it then analyses too
INCLUDE_CATEGORIES = {"reformats": "derived reformat", "dose_screens": "dose screen",
                      "duplicates": "duplicate reconstruction"}


class SelectionError(ValueError):
    """A [[selection]] rule that cannot be used; ``str()`` starts with the key, e.g. "key 'x' ..."."""


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at, taken from the loaded series (first slice's header and the volume)."""

    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    scanner: str | None = None  # the [[scanners]] name; None for offline files
    image_type: tuple[str, ...] = ()
    slice_thickness_mm: float | None = None
    rows: int | None = None
    columns: int | None = None
    n_slices: int = 0
    kernel: tuple[str, ...] = ()
    protocol: str | None = None
    series_description: str | None = None
    body_part: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    z_range_mm: tuple[float, float] | None = None

    def reconstruction_key(self) -> str:
        """Equal for two series that hold the same reconstruction of the same acquisition."""
        def r(v):
            return "-" if v is None else f"{float(v):.2f}"

        sp = self.pixel_spacing_mm or (None, None)
        z = self.z_range_mm or (None, None)
        return "|".join([
            "\\".join(self.image_type), "\\".join(self.kernel), r(self.slice_thickness_mm), r(sp[0]), r(sp[1]),
            f"{self.rows}x{self.columns}", str(self.n_slices), r(z[0]), r(z[1]),
        ])


def _upper_values(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = v.split("\\")
    return tuple(str(x).strip().upper() for x in v if str(x).strip())


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def facts_from_volume(volume, *, scanner: str | None = None, series_instance_uid: str | None = None,
                      study_instance_uid: str | None = None) -> SeriesFacts:
    """SeriesFacts of a loaded ``analysis.volume.CTVolume``."""
    hdr = volume.header
    meta = volume.meta or {}

    def get(name):
        return getattr(hdr, name, None) if hdr is not None else None

    pos = volume.slice_positions_mm
    z = (float(min(pos)), float(max(pos))) if pos is not None and len(pos) else None
    thickness = meta.get("slice_thickness_mm")
    return SeriesFacts(
        series_instance_uid=series_instance_uid or _text(get("SeriesInstanceUID")),
        study_instance_uid=study_instance_uid or _text(get("StudyInstanceUID")),
        scanner=scanner,
        image_type=_upper_values(get("ImageType")),
        slice_thickness_mm=float(thickness) if thickness is not None else None,
        rows=int(volume.hu.shape[1]), columns=int(volume.hu.shape[2]), n_slices=int(volume.n_slices),
        kernel=_upper_values(get("ConvolutionKernel")),
        protocol=_text(get("ProtocolName")), series_description=_text(get("SeriesDescription")),
        body_part=_text(get("BodyPartExamined")),
        pixel_spacing_mm=tuple(float(x) for x in volume.pixel_spacing_mm),  # type: ignore[arg-type]
        z_range_mm=z,
    )


@dataclass(frozen=True)
class Decision:
    """One model's verdict on one series: ``rule`` is the [[selection]] name or "default: ..."."""

    model: str
    selected: bool
    rule: str
    reason: str

    def as_dict(self) -> dict:
        return {"model": self.model, "selected": self.selected, "rule": self.rule, "reason": self.reason}


def _glob(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value.upper(), pattern.upper())


@dataclass(frozen=True)
class Rule:
    name: str
    models: tuple[str, ...] = ()  # empty: every model (an analyse rule: every model but basic)
    action: str = ANALYSE
    include: tuple[str, ...] = ()  # INCLUDE_CATEGORIES keys: defaults this analyse rule overrides
    image_type: tuple[tuple[str, ...], ...] = ()  # each pattern split into its values
    slice_thickness_mm: tuple[float, float] | None = None
    rows: tuple[float, float] | None = None
    columns: tuple[float, float] | None = None
    min_slices: int | None = None
    scanner: tuple[str, ...] = ()
    kernel: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    series_description: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()

    def applies_to(self, model: str) -> bool:
        """An analyse rule is a whitelist: one without ``models`` leaves ``basic`` alone (a series it
        does not match keeps its basic statistics and trend row); a skip rule without ``models``
        skips every model."""
        if self.models:
            return model in self.models
        return model != BASIC or self.action == SKIP

    def mismatch(self, f: SeriesFacts) -> str | None:
        """None when the series matches every condition, else the first condition it fails."""
        if self.image_type:
            ok = any(len(p) <= len(f.image_type) and all(_glob(pv, v) for pv, v in zip(p, f.image_type))
                     for p in self.image_type)
            if not ok:
                shown = "\\".join(f.image_type) or "absent"
                return f"ImageType {shown} matches none of {', '.join(chr(92).join(p) for p in self.image_type)}"
        for key, label in _RANGE_KEYS.items():
            rng = getattr(self, key)
            if rng is None:
                continue
            v = getattr(f, key)
            unit = " mm" if key == "slice_thickness_mm" else ""
            if v is None:
                return f"{label} absent (rule wants {rng[0]:g}-{rng[1]:g}{unit})"
            if not rng[0] <= v <= rng[1]:
                return f"{label} {v:g}{unit} outside {rng[0]:g}-{rng[1]:g}{unit}"
        if self.min_slices is not None and f.n_slices < self.min_slices:
            return f"{f.n_slices} slices, fewer than {self.min_slices}"
        for key, label in _PATTERN_KEYS.items():
            patterns = getattr(self, key)
            if not patterns:
                continue
            raw = getattr(f, key)
            values = raw if isinstance(raw, tuple) else ((raw,) if raw else ())
            if not values:
                return f"{label} absent (rule wants {', '.join(patterns)})"
            if not any(_glob(p, v) for p in patterns for v in values):
                return f"{label} {'/'.join(values)!r} matches none of {', '.join(patterns)}"
        return None


def _patterns(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise SelectionError(f"key '{key}' must be a pattern or a list of patterns (non-empty strings), got {v!r}")
    return tuple(x.strip() for x in v)


def _range(v: Any, key: str, integer: bool = False) -> tuple[float, float]:
    what = "integers" if integer else "numbers"
    if (not isinstance(v, list) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            or (integer and not all(isinstance(x, int) for x in v))):
        raise SelectionError(f"key '{key}' must be [min, max] ({what}), got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or lo > hi:
        raise SelectionError(f"key '{key}' must satisfy 0 <= min <= max, got {v!r}")
    return lo, hi


def parse_rule(raw: Any, known_models: Iterable[str], index: int = 0) -> Rule:
    """One [[selection]] table -> Rule. SelectionError names the key (``key 'selection[i].x' ...``)."""
    pre = f"selection[{index}]"
    if not isinstance(raw, dict):
        raise SelectionError(f"key '{pre}' must be a table ([[selection]]), got {raw!r}")
    unknown = sorted(set(raw) - set(RULE_KEYS))
    if unknown:
        raise SelectionError(f"unknown key '{pre}.{unknown[0]}'; expected one of: {', '.join(sorted(RULE_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SelectionError(f"key '{pre}.name' must be a non-empty string (it names the rule in every decision)")
    kwargs: dict[str, Any] = {"name": name.strip()}
    known = list(known_models)
    if "models" in raw:
        models = raw["models"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise SelectionError(f"key '{pre}.models' must be a non-empty list of model names, got {models!r}")
        for m in models:
            if m not in known:
                raise SelectionError(f"key '{pre}.models' names unknown model {m!r}; known: {', '.join(known)}")
        kwargs["models"] = tuple(models)
    if "action" in raw:
        if raw["action"] not in (ANALYSE, SKIP):
            raise SelectionError(f"key '{pre}.action' must be \"analyse\" or \"skip\", got {raw['action']!r}")
        kwargs["action"] = raw["action"]
    if "include" in raw:
        inc = raw["include"]
        if (not isinstance(inc, list) or not inc or not all(isinstance(x, str) for x in inc)
                or any(x not in INCLUDE_CATEGORIES for x in inc)):
            raise SelectionError(f"key '{pre}.include' must be a non-empty list of {', '.join(INCLUDE_CATEGORIES)}, "
                                 f"got {inc!r}")
        if kwargs.get("action", ANALYSE) != ANALYSE:
            raise SelectionError(f"key '{pre}.include' applies to analyse rules only (this rule skips)")
        kwargs["include"] = tuple(inc)
    if "image_type" in raw:
        kwargs["image_type"] = tuple(_upper_values(p) for p in _patterns(raw["image_type"], f"{pre}.image_type"))
    for key in _RANGE_KEYS:
        if key in raw:
            kwargs[key] = _range(raw[key], f"{pre}.{key}", integer=key != "slice_thickness_mm")
    if "min_slices" in raw:
        v = raw["min_slices"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SelectionError(f"key '{pre}.min_slices' must be an integer >= 1, got {v!r}")
        kwargs["min_slices"] = v
    for key in _PATTERN_KEYS:
        if key in raw:
            kwargs[key] = _patterns(raw[key], f"{pre}.{key}")
    return Rule(**kwargs)


def parse_rules(raw: Any, known_models: Iterable[str]) -> tuple[Rule, ...]:
    """The [[selection]] array of tables -> rules (SelectionError on the first problem)."""
    if not isinstance(raw, list):
        raise SelectionError(f"key 'selection' must be an array of tables ([[selection]]), got {raw!r}")
    known = list(known_models)
    rules = tuple(parse_rule(r, known, i) for i, r in enumerate(raw))
    seen: set[str] = set()
    for i, r in enumerate(rules):
        if r.name in seen:
            raise SelectionError(f"key 'selection[{i}].name' repeats the rule name {r.name!r}; names must be unique")
        seen.add(r.name)
    return rules


def default_category(f: SeriesFacts, duplicate_of: str | None = None) -> tuple[str, str] | None:
    """(category, reason) of a series the defaults leave out, or None when they analyse it."""
    it = f.image_type
    dose = [v for v in it if v in DOSE_IMAGE_TYPE_VALUES]
    if dose:
        return "dose screen", f"dose screen (ImageType {dose[0]})"
    for label, text in (("SeriesDescription", f.series_description), ("ProtocolName", f.protocol)):
        if text and any(_glob(p, text) for p in DOSE_DESCRIPTIONS):
            return "dose screen", f"dose screen ({label} {text!r})"
    if "LOCALIZER" in it:  # load_series skips these first; kept for facts built elsewhere
        return "localizer", "localizer (ImageType LOCALIZER)"
    if duplicate_of:
        return "duplicate reconstruction", (
            f"duplicate reconstruction: same ImageType, kernel, slice thickness, pixel spacing, matrix, slice "
            f"count and z range as series {duplicate_of} of this study, already analysed")
    reformat = reformat_of(it)
    if reformat == "DERIVED SECONDARY":
        return "derived reformat", f"derived secondary image (ImageType {chr(92).join(it)})"
    if reformat:
        return "derived reformat", f"derived reformat (ImageType {chr(92).join(it)})"
    return None


def reformat_of(image_type: Any) -> str | None:
    """What makes a series a derived reformat: its first ImageType value (3rd or later) that marks a
    reformat or projection (``"MIP"``, ``"MPR"``...), else ``"DERIVED SECONDARY"`` for
    DERIVED\\SECONDARY; None for acquired slices (``DERIVED\\PRIMARY`` included). ``image_type``: the
    attribute's value (a backslash-joined string or the values) or SeriesFacts.image_type."""
    it = image_type if isinstance(image_type, tuple) else _upper_values(image_type)
    marks = [v for v in it[2:] if v in REFORMAT_VALUES]
    if marks:
        return marks[0]
    if it[:2] == ("DERIVED", "SECONDARY"):
        return "DERIVED SECONDARY"
    return None


@dataclass(frozen=True)
class SelectionPolicy:
    rules: tuple[Rule, ...] = ()

    def decide(self, facts: SeriesFacts, models: Sequence[str], *, duplicate_of: str | None = None) -> list[Decision]:
        return [self.decide_one(facts, m, duplicate_of=duplicate_of) for m in models]

    def decide_one(self, facts: SeriesFacts, model: str, *, duplicate_of: str | None = None) -> Decision:
        applicable = [r for r in self.rules if r.applies_to(model)]
        misses = []
        for r in applicable:
            why = r.mismatch(facts)
            if why is None:
                if r.action == SKIP:
                    return Decision(model, False, r.name, f"skipped by [[selection]] rule {r.name!r}")
                cat = default_category(facts, duplicate_of)
                if cat is not None and cat[0] not in (INCLUDE_CATEGORIES[k] for k in r.include):
                    # a rule matching on other grounds does not pull in what the defaults leave out
                    key = next((k for k, v in INCLUDE_CATEGORIES.items() if v == cat[0]), None)
                    ask = f" (rule {r.name!r} matches; include = [\"{key}\"] would analyse it)" if key else ""
                    return self._default(model, cat, ask)
                return Decision(model, True, r.name, f"selected by [[selection]] rule {r.name!r}")
            misses.append(f"{r.name}: {why}")
        if any(r.action == ANALYSE for r in applicable):
            return Decision(model, False, "(no matching rule)",
                            f"matches no [[selection]] rule for {model} ({'; '.join(misses)})")
        cat = default_category(facts, duplicate_of)
        if cat is None:
            return Decision(model, True, "default", "default: an acquired axial CT series")
        return self._default(model, cat)

    @staticmethod
    def _default(model: str, cat: tuple[str, str], note: str = "") -> Decision:
        category, reason = cat
        if category == "derived reformat" and model == BASIC:
            return Decision(model, True, f"default: {category}",
                            f"default: basic statistics are kept for a {reason}")
        return Decision(model, False, f"default: {category}", f"default: skipped, {reason}{note}")


def load_skip_decisions(reason: str, models: Sequence[str]) -> list[Decision]:
    """Every model skips a series that ``load_series`` already refused (localizer, not axial, not a
    CT image...): the decisions say so with the loader's reason."""
    low = reason.lower()
    category = ("localizer" if low.startswith("localizer") else "not axial" if low.startswith("not axial")
                else "not a CT image series")
    return [Decision(m, False, f"default: {category}", f"default: skipped, {reason}") for m in models]


def summarise(decisions: Sequence[Decision], requested: Sequence[str]) -> tuple[bool, str | None]:
    """(series skipped?, reason) from the per-model decisions. Skipped: no model selected, or only
    ``basic`` where more were asked. The reason names the models skipped and why."""
    selected = [d.model for d in decisions if d.selected]
    skipped = [d for d in decisions if not d.selected]
    reformat_basic = [d for d in decisions if d.selected and d.rule == "default: derived reformat"]
    if not skipped:
        if reformat_basic and len(reformat_basic) == len(selected):
            # only basic was asked: a reformat keeps its statistics and trend row but, as with more
            # models asked, gets no outputs
            return True, f"not selected: {reformat_basic[0].reason}"
        return False, None
    by_reason: dict[str, list[str]] = {}
    for d in skipped:
        by_reason.setdefault(d.reason, []).append(d.model)
    text = "; ".join(f"{', '.join(ms)}: {reason}" for reason, ms in by_reason.items())
    series_skipped = not selected or (set(selected) == {BASIC} and len(requested) > 1)
    prefix = "not selected" if series_skipped else "selection"
    return series_skipped, f"{prefix}: {text}"


def record_json(decisions: Sequence[Decision], facts: SeriesFacts | None) -> str | None:
    """What the node stores with the job (``Job.selection``): the decisions and the series'
    reconstruction key (for finding duplicates). None when there is nothing to record."""
    import json

    if not decisions and facts is None:
        return None
    return json.dumps({"reconstruction": facts.reconstruction_key() if facts is not None else None,
                       "decisions": [d.as_dict() for d in decisions]}, sort_keys=True)


def decisions_from_json(text: str | None) -> list[dict]:
    """The stored form back (list of {model, selected, rule, reason}); [] for absent or bad data."""
    import json

    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    if isinstance(data, Mapping):
        data = data.get("decisions")
    return [dict(d) for d in data if isinstance(d, Mapping)] if isinstance(data, list) else []


__all__ = ["ANALYSE", "SKIP", "Decision", "Rule", "SelectionError", "SelectionPolicy", "SeriesFacts",
           "decisions_from_json", "default_category", "facts_from_volume", "parse_rules", "record_json", "summarise"]

