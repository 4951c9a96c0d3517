"""Series selection ([[selection]] rules and the defaults) on real series: the shared Philips head
phantom (5 mm and 1 mm reconstructions, kernel UB, BodyPartExamined BRAIN, StationName CT4) and the
real-world corpus (a localizer, a non-axial MPR, lossy-compressed DERIVED\\PRIMARY originals).
Each test asserts which models run and the reason text."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from analysis.pipeline import analyse_series
from analysis.results import RunContext
from analysis.selection import SelectionError, SelectionPolicy, SeriesFacts, facts_from_volume, parse_rules, summarise
from analysis.volume import load_series
from node.config import ConfigError, settings_from_dict
from tests.helpers import PHANTOM_1MM, PHANTOM_5MM, SHARED_DATA, require

CORPUS = SHARED_DATA / "corpus"
MODELS = ["basic", "classical", "n2q", "d2iqa"]
CTX = RunContext(device="cpu")


def files(folder: Path, n: int | None = None) -> list[Path]:
    out = sorted(p for p in require(folder).iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    return out[:n] if n else out


@pytest.fixture(scope="module")
def thick():
    return facts_from_volume(load_series(files(PHANTOM_5MM)), scanner="CT1")


@pytest.fixture(scope="module")
def thin():
    return facts_from_volume(load_series(files(PHANTOM_1MM, 3)), scanner="CT1")


def policy(*rules: dict) -> SelectionPolicy:
    return SelectionPolicy(parse_rules(list(rules), MODELS + ["ldctiqa"]))


def by_model(decisions):
    return {d.model: d for d in decisions}


def test_facts_of_the_real_series(thick, thin):
    assert thick.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert thick.slice_thickness_mm == 5.0 and thin.slice_thickness_mm == 1.0
    assert (thick.rows, thick.columns, thick.n_slices) == (512, 512, 28)
    assert thick.kernel == ("UB",) and thick.body_part == "BRAIN" and thick.scanner == "CT1"
    assert thick.series_description == "STD BRAIN 5MM"
    assert thin.n_slices == 3


def test_defaults_analyse_an_acquired_axial_series_with_every_model(thick):
    ds = by_model(SelectionPolicy().decide(thick, MODELS))
    assert all(d.selected and d.rule == "default" for d in ds.values())
    assert ds["n2q"].reason == "default: an acquired axial CT series"
    assert summarise(list(ds.values()), MODELS) == (False, None)


def test_thickness_rule_selects_the_thin_series_and_names_why_the_thick_one_is_skipped(thick, thin):
    p = policy({"name": "thin only", "models": ["n2q", "d2iqa"], "slice_thickness_mm": [0.5, 2.0]})
    on_thin = by_model(p.decide(thin, MODELS))
    on_thick = by_model(p.decide(thick, MODELS))
    assert on_thin["n2q"].selected and on_thin["n2q"].rule == "thin only"
    assert on_thin["n2q"].reason == "selected by [[selection]] rule 'thin only'"
    assert not on_thick["n2q"].selected and on_thick["n2q"].rule == "(no matching rule)"
    assert on_thick["d2iqa"].reason == ("matches no [[selection]] rule for d2iqa "
                                        "(thin only: slice thickness 5 mm outside 0.5-2 mm)")
    # models the rule does not name keep the defaults
    assert on_thick["basic"].selected and on_thick["classical"].rule == "default"
    skipped, why = summarise(list(on_thick.values()), MODELS)
    assert not skipped
    assert why == ("selection: n2q: matches no [[selection]] rule for n2q (thin only: slice thickness 5 mm outside "
                   "0.5-2 mm); d2iqa: matches no [[selection]] rule for d2iqa (thin only: slice thickness 5 mm "
                   "outside 0.5-2 mm)")


def test_every_condition_key_on_the_real_header(thick):
    def decide(**rule):
        return p_one({"name": "r", "models": ["classical"], **rule})

    def p_one(rule):
        return policy(rule).decide_one(thick, "classical")

    assert decide(image_type=["ORIGINAL\\PRIMARY\\AXIAL"]).selected
    assert decide(image_type=["original\\primary"]).selected  # fewer values: leading values, any case
    assert decide(image_type=["*\\*\\AX*"]).selected
    d = decide(image_type=["DERIVED\\*"])
    assert not d.selected and "ImageType ORIGINAL\\PRIMARY\\AXIAL matches none of DERIVED\\*" in d.reason
    assert decide(kernel="U*").selected
    assert "ConvolutionKernel 'UB' matches none of B3*" in decide(kernel=["B3*"]).reason
    assert decide(body_part=["HEAD", "BRAIN"]).selected
    assert "BodyPartExamined 'BRAIN' matches none of CHEST" in decide(body_part="CHEST").reason
    assert decide(series_description="*brain*").selected
    assert decide(protocol="*TRAUMA*").selected
    assert decide(rows=[512, 512], columns=[256, 1024]).selected
    assert "rows 512 outside 256-256" in decide(rows=[256, 256]).reason
    assert "28 slices, fewer than 30" in decide(min_slices=30).reason
    assert decide(scanner="CT?").selected
    assert "scanner 'CT1' matches none of CT2" in decide(scanner="CT2").reason
    # all keys must match: one failing key fails the rule
    assert not decide(kernel="UB", slice_thickness_mm=[0.5, 2.0]).selected


def test_offline_files_have_no_scanner_so_a_scanner_rule_does_not_match(thick):
    d = policy({"name": "ct1", "scanner": "CT1"}).decide_one(replace(thick, scanner=None), "classical")
    assert not d.selected and "scanner absent (rule wants CT1)" in d.reason


def test_first_matching_rule_decides_and_skip_rules_fall_back_to_the_defaults(thick, thin):
    p = policy({"name": "no thin d2iqa", "models": ["d2iqa"], "action": "skip", "slice_thickness_mm": [0, 1.5]},
               {"name": "all d2iqa", "models": ["d2iqa"]})
    assert by_model(p.decide(thin, ["d2iqa"]))["d2iqa"].rule == "no thin d2iqa"
    assert not by_model(p.decide(thin, ["d2iqa"]))["d2iqa"].selected
    assert by_model(p.decide(thick, ["d2iqa"]))["d2iqa"].rule == "all d2iqa"
    only_skip = policy({"name": "no thin", "action": "skip", "slice_thickness_mm": [0, 1.5]})
    d = only_skip.decide_one(thick, "classical")
    assert d.selected and d.rule == "default"  # a skip rule alone is no whitelist
    assert only_skip.decide_one(thin, "classical").reason == "skipped by [[selection]] rule 'no thin'"


def test_defaults_for_reformats_dose_screens_and_duplicates(thick):
    mpr = replace(thick, image_type=("DERIVED", "SECONDARY", "AXIAL", "MPR"))
    ds = by_model(SelectionPolicy().decide(mpr, MODELS))
    assert ds["basic"].selected and ds["basic"].rule == "default: derived reformat"
    assert not ds["classical"].selected
    assert ds["classical"].reason == "default: skipped, derived reformat (ImageType DERIVED\\SECONDARY\\AXIAL\\MPR)"
    skipped, why = summarise(list(ds.values()), MODELS)
    assert skipped and why.startswith("not selected: classical, n2q, d2iqa: default: skipped, derived reformat")
    # only basic asked: the reformat keeps basic, ends skipped as well (no outputs)
    assert summarise(SelectionPolicy().decide(mpr, ["basic"]), ["basic"]) == (
        True, "not selected: default: basic statistics are kept for a derived reformat "
              "(ImageType DERIVED\\SECONDARY\\AXIAL\\MPR)")
    assert summarise(SelectionPolicy().decide(thick, ["basic"]), ["basic"]) == (False, None)
    # an analyse rule that matches the reformat analyses it only when it asks for reformats
    matching = policy({"name": "mpr", "image_type": "DERIVED\\SECONDARY"})
    d = matching.decide_one(mpr, "classical")
    assert not d.selected and d.rule == "default: derived reformat"
    assert d.reason.endswith("(rule 'mpr' matches; include = [\"reformats\"] would analyse it)")
    asked = policy({"name": "mpr too", "image_type": "DERIVED\\SECONDARY", "include": ["reformats"]})
    d = asked.decide_one(mpr, "classical")
    assert d.selected and d.rule == "mpr too"
    dose = replace(thick, image_type=("DERIVED", "SECONDARY", "OTHER"), series_description="Dose Report")
    d = SelectionPolicy().decide_one(dose, "basic")
    assert not d.selected and d.reason == "default: skipped, dose screen (SeriesDescription 'Dose Report')"
    dup = SelectionPolicy().decide_one(thick, "basic", duplicate_of="1.2.3")
    assert not dup.selected and dup.rule == "default: duplicate reconstruction" and "series 1.2.3" in dup.reason
    # the same images under a new UID have the same reconstruction key; another thickness has not
    assert replace(thick, series_instance_uid="9.9").reconstruction_key() == thick.reconstruction_key()
    assert replace(thick, slice_thickness_mm=1.0).reconstruction_key() != thick.reconstruction_key()


def test_lossy_compressed_derived_primary_originals_are_still_analysed():
    # WG-04 CT1 as JPEG-LS near-lossless: ImageType DERIVED\PRIMARY\AXIAL (derived by compression only)
    vol = load_series(files(CORPUS / "pylibjpeg-data" / "GE_RHAPSODE_CT1_JPEGLS_near"))
    d = SelectionPolicy().decide_one(facts_from_volume(vol), "classical")
    assert d.selected and d.rule == "default"


@pytest.mark.parametrize("folder,rule,reason", [
    ("Philips_Brilliance64_localizer_J2K", "default: localizer", "default: skipped, localizer (ImageType LOCALIZER)"),
    ("Toshiba_Aquilion_J2K_SIZ0_MPR", "default: not axial",
     "default: skipped, not axial (slice normal 90 degrees from the patient z axis)"),
])
def test_corpus_localizer_and_mpr_are_skipped_for_every_model(folder, rule, reason):
    r = analyse_series(files(CORPUS / "pylibjpeg-data" / folder), ["basic", "classical"], CTX,
                       selection=SelectionPolicy())
    assert r.status == "skipped" and r.outputs == []
    assert [(d.model, d.selected, d.rule, d.reason) for d in r.selection] == [
        ("basic", False, rule, reason), ("classical", False, rule, reason)]


def test_a_derived_reformat_of_the_real_series_keeps_only_its_basic_statistics(tmp_path):
    src = files(PHANTOM_5MM, 4)
    for f in src:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "MPR"]
        ds.save_as(tmp_path / f.name)
    r = analyse_series(sorted(tmp_path.iterdir()), ["basic", "classical"], CTX, selection=SelectionPolicy())
    assert r.status == "skipped"
    assert r.reason == ("not selected: classical: default: skipped, derived reformat "
                        "(ImageType DERIVED\\SECONDARY\\AXIAL\\MPR)")
    assert [o.name for o in r.outputs] == ["basic"] and r.metrics["n_slices"] == 4
    # without a policy every model runs, as before selection existed
    r_all = analyse_series(sorted(tmp_path.iterdir()), ["basic", "classical"], CTX)
    assert r_all.status == "done" and [o.name for o in r_all.outputs] == ["basic", "classical"]


@pytest.mark.parametrize("rule,message", [
    ({"name": "a", "kernal": "B*"}, "unknown key 'selection[0].kernal'; expected one of: action, body_part"),
    ({"name": "a", "slice_thickness_mm": [2.0, 1.0]}, "key 'selection[0].slice_thickness_mm' must satisfy 0 <= min <= max"),
    ({"name": "a", "slice_thickness_mm": 1.0}, "key 'selection[0].slice_thickness_mm' must be [min, max] (numbers)"),
    ({"name": "a", "rows": [1.5, 512]}, "key 'selection[0].rows' must be [min, max] (integers)"),
    ({"name": "a", "models": ["n2qq"]}, "key 'selection[0].models' names unknown model 'n2qq'; known: basic"),
    ({"name": "a", "action": "run"}, "key 'selection[0].action' must be \"analyse\" or \"skip\", got 'run'"),
    ({"name": "a", "kernel": 3}, "key 'selection[0].kernel' must be a pattern or a list of patterns"),
    ({"name": "a", "min_slices": True}, "key 'selection[0].min_slices' must be an integer >= 1, got True"),
    ({"kernel": "B*"}, "key 'selection[0].name' must be a non-empty string"),
])
def test_bad_rules_are_one_config_error_line(rule, message):
    with pytest.raises(ConfigError) as exc:
        settings_from_dict({"node": {}, "selection": [rule]}, "cfg.toml")
    assert str(exc.value).startswith("cfg.toml: " + message) and "\n" not in str(exc.value)


def test_duplicate_rule_names_and_a_selection_table_instead_of_an_array():
    with pytest.raises(ConfigError, match="key 'selection\\[1\\].name' repeats the rule name 'a'"):
        settings_from_dict({"node": {}, "selection": [{"name": "a"}, {"name": "a"}]}, "cfg.toml")
    with pytest.raises(ConfigError, match="must be an array of tables"):
        settings_from_dict({"node": {}, "selection": {"name": "a"}}, "cfg.toml")


def test_cli_exits_2_with_one_line_for_a_bad_rule(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\n[[selection]]\nname = "x"\nslice_thickness_mm = "thin"\n')
    r = subprocess.run([sys.executable, "-m", "node", "--config", str(cfg), "analyze", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"qa-node: configuration error: {cfg}: key 'selection[0].slice_thickness_mm' must be [min, max] (numbers), got 'thin'"]


def test_facts_reject_nothing_for_missing_attributes():
    f = SeriesFacts(n_slices=3)
    d = policy({"name": "k", "kernel": "B*"}).decide_one(f, "classical")
    assert not d.selected and "ConvolutionKernel absent (rule wants B*)" in d.reason
    assert SelectionPolicy().decide_one(f, "basic").selected


def test_a_broad_rule_does_not_pull_in_dose_screens_duplicates_or_reformats(thick):
    """A rule selecting on the scanner (the README's kind of rule) analyses CT1's acquired series
    only: a dose screen, a duplicate reconstruction and a MIP of CT1 stay with the defaults unless
    the rule's include asks for them; each include brings in its category alone."""
    ct1 = replace(thick, scanner="CT1")
    dose = replace(ct1, series_description="Dose Report")
    mip = replace(ct1, image_type=("DERIVED", "SECONDARY", "AXIAL", "MIP"))
    broad = policy({"name": "ct1", "models": ["n2q", "d2iqa"], "scanner": "CT1"})
    assert [d.selected for d in broad.decide(ct1, ["n2q", "d2iqa"])] == [True, True]
    for facts, dup, rule in [(dose, None, "default: dose screen"), (ct1, "1.2.3", "default: duplicate reconstruction"),
                             (mip, None, "default: derived reformat")]:
        for d in broad.decide(facts, ["n2q", "d2iqa"], duplicate_of=dup):
            assert not d.selected and d.rule == rule, d
    for include, facts, dup in [("dose_screens", dose, None), ("duplicates", ct1, "1.2.3"), ("reformats", mip, None)]:
        asking = policy({"name": "ct1", "models": ["n2q"], "scanner": "CT1", "include": [include]})
        assert asking.decide_one(facts, "n2q", duplicate_of=dup).selected, include
        others = [f for f in (dose, mip) if f is not facts]
        assert not any(asking.decide_one(f, "n2q").selected for f in others), include


def test_an_analyse_rule_without_models_leaves_basic_to_the_defaults(thick):
    """A whitelist over every model does not cost a series it misses its basic statistics (and trend
    row); a skip rule without models skips basic too; a rule naming basic whitelists it."""
    ct1_only = policy({"name": "ct1", "scanner": "CT1"})
    ct2 = replace(thick, scanner="CT2")
    ds = by_model(ct1_only.decide(ct2, MODELS))
    assert ds["basic"].selected and ds["basic"].rule == "default"
    assert not any(ds[m].selected for m in MODELS if m != "basic")
    assert not policy({"name": "no ct2", "action": "skip", "scanner": "CT2"}).decide_one(ct2, "basic").selected
    assert not policy({"name": "b", "models": ["basic"], "scanner": "CT1"}).decide_one(ct2, "basic").selected


@pytest.mark.parametrize("rule,message", [
    ({"name": "x", "include": "reformats"}, "key 'selection[0].include' must be a non-empty list of reformats, "
                                             "dose_screens, duplicates, got 'reformats'"),
    ({"name": "x", "include": ["mips"]}, "key 'selection[0].include' must be a non-empty list"),
    ({"name": "x", "action": "skip", "include": ["reformats"]},
     "key 'selection[0].include' applies to analyse rules only (this rule skips)"),
])
def test_bad_include_is_one_line_naming_the_key(rule, message):
    with pytest.raises(SelectionError) as exc:
        parse_rules([rule], MODELS)
    assert message in str(exc.value)
