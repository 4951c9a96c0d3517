"""TID 1500 Measurement Report: built from real CT headers, written, read back field by field."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from reports.codes import (
    CATALOGUE,
    MAPS,
    OUTSIDE_CONTROL_LIMITS,
    PRIVATE_CODES,
    PRIVATE_SCHEME,
    WITHIN_CONTROL_LIMITS,
    metric_code,
)
from reports.common import derived_uids
from reports.inputs import (
    AlgorithmId,
    ControlLimits,
    Evaluation,
    MetricValue,
    SliceMetricValue,
    metrics_from_mapping,
    slice_metrics_from_array,
)
from reports.sr import build_measurement_report, read_measurement_report, read_notes
from tests.unit.report_sources import assert_patient_study_copied, enhanced_ct_header, roundtrip

CLASSICAL = AlgorithmId("ctqa-classical", "1.2.0")
N2Q = AlgorithmId("n2q", "0.3.1", "4d7596a1638ebb1ccb8945f079b08b30791a1241965f1541dc842d48a0341bc2")
REQUIRED_KEYS = (
    "global_noise_hu wed_cm ssde_mgy ctdivol_mgy nps_f_peak_per_mm nps_f_avg_per_mm nps_noise_hu mean_hu_tissue "
    "sd_hu_tissue body_mean_hu body_sd_hu n_slices scan_length_mm kvp slice_thickness_mm n2q_mean_quality "
    "n2q_p05_quality n2q_low_fraction d2iqa_score"
).split()


@pytest.fixture(scope="module")
def series_metrics() -> list[MetricValue]:
    return [
        MetricValue("global_noise_hu", 4.837261905, CLASSICAL, Evaluation.WITHIN, ControlLimits(3.9, 5.6)),
        MetricValue("wed_cm", 17.25, CLASSICAL),
        MetricValue(
            "ssde_mgy", 29.918273645546, CLASSICAL, Evaluation.OUTSIDE, ControlLimits(None, 25.0, "CMS1074 threshold")
        ),
        MetricValue("ctdivol_mgy", 15.3, CLASSICAL),
        MetricValue("nps_f_peak_per_mm", 0.2125, CLASSICAL),
        MetricValue("n_slices", 28, CLASSICAL),
        MetricValue("n2q_mean_quality", 0.8125, N2Q),
        MetricValue("n2q_low_fraction", 1e-3, N2Q),
    ]


@pytest.fixture(scope="module")
def written(headers, series_metrics):
    noise = [3.0 + 0.125 * i for i in range(len(headers))]
    ctdi = [float("nan") if i == 5 else 9.0 + 0.5 * i for i in range(len(headers))]
    slices = slice_metrics_from_array(
        "global_noise_hu",
        noise,
        [h.SOPClassUID for h in headers],
        [h.SOPInstanceUID for h in headers],
        [None] * len(headers),
        CLASSICAL,
    ) + slice_metrics_from_array(
        "ctdivol_mgy",
        ctdi,
        [h.SOPClassUID for h in headers],
        [h.SOPInstanceUID for h in headers],
        [None] * len(headers),
        CLASSICAL,
    )
    sr = build_measurement_report(headers, series_metrics, slices, series_number=9001, instance_number=3)
    return sr, roundtrip(sr), slices


def test_catalogue_covers_required_keys_with_unique_codes() -> None:
    for key in REQUIRED_KEYS:
        mc = metric_code(key)
        assert mc.unit.scheme_designator == "UCUM"
        assert mc.concept.scheme_designator in ("DCM", "SCT", "LN", PRIVATE_SCHEME)
    concepts = [(m.concept.scheme_designator, m.concept.value) for m in CATALOGUE.values()]
    assert len(concepts) == len(set(concepts))
    assert metric_code("ssde_mgy").concept.value == "113930" and metric_code("ssde_mgy").unit.value == "mGy"
    assert metric_code("wed_cm").concept.value == "113980" and metric_code("wed_cm").unit.value == "cm"
    assert metric_code("ctdivol_mgy").concept.value == "113830"
    assert metric_code("global_noise_hu").unit.value == "[hnsf'U]"
    with pytest.raises(ValueError, match="Unknown metric key 'no_such_metric'"):
        metric_code("no_such_metric")


def test_private_codes_are_documented_in_outputs_md() -> None:
    """Every private code and metric key is in docs/outputs.md or in the card of the model that
    declares it (a new model documents its codes in its own card, "| `VALUE` | meaning |" rows)."""
    from analysis.models import specs

    root = Path(__file__).resolve().parents[2]
    cards = [(root / s.model_card).read_text(encoding="utf-8") for s in specs().values() if s.model_card]
    doc = "\n".join([(root / "docs" / "outputs.md").read_text(encoding="utf-8"), *cards])
    for value, meaning in PRIVATE_CODES.items():
        row = re.search(rf"^\|\s*`?{re.escape(value)}`?\s*\|\s*{re.escape(meaning)}\s*\|", doc, re.M)
        assert row, f"private code {value} ({meaning}) is not in the docs/outputs.md table"
    for key in CATALOGUE:
        assert f"`{key}`" in doc, f"metric key {key} missing from docs/outputs.md"
    for name in MAPS:
        assert f"`{name}`" in doc


def test_sr_is_in_source_study_with_patient_module(headers, written) -> None:
    _, ds, _ = written
    src = headers[0]
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SeriesNumber == 9001 and ds.InstanceNumber == 3
    assert assert_patient_study_copied(ds, src) >= 10
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.Manufacturer == "CT QA Node project"


def test_sr_references_every_analysed_image(headers, written) -> None:
    _, ds, _ = written
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {h.SOPInstanceUID for h in headers}
    series_uids = {
        series.SeriesInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert series_uids == {headers[0].SeriesInstanceUID}
    # TID 1600 image library
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    library = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    assert len(library) == 1
    lib_uids = set()
    for group in library[0].ContentSequence:
        for entry in group.ContentSequence:
            if entry.ValueType == "IMAGE":
                lib_uids.add(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert lib_uids == {h.SOPInstanceUID for h in headers}


def test_private_scheme_declared(written) -> None:
    _, ds, _ = written
    items = [i for i in ds.CodingSchemeIdentificationSequence if i.CodingSchemeDesignator == PRIVATE_SCHEME]
    assert len(items) == 1
    assert items[0].CodingSchemeName == "CT QA Node private codes"


def test_series_measurements_values_codes_units_algorithm(written, series_metrics) -> None:
    _, ds, _ = written
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = sr.content.get_image_measurement_groups()
    series_groups = {g.tracking_identifier: g for g in groups if g.tracking_identifier.startswith("Series QA: ")}
    assert set(series_groups) == {"Series QA: ctqa-classical", "Series QA: n2q"}
    for m in series_metrics:
        group = series_groups[f"Series QA: {m.algorithm.name}"]
        mc = metric_code(m.key)
        found = group.get_measurements(name=mc.concept)
        assert len(found) == 1, m.key
        assert found[0].value == m.value  # exact: highdicom adds FloatingPointValue where DS would round
        assert found[0].unit == mc.unit
        assert found[0].name.meaning == mc.concept.meaning
        assert found[0].referenced_images == []
    # TID 4019 on the n2q group: name, version, weights checksum
    n2q_group = series_groups["Series QA: n2q"]
    texts = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.TextValue)
        for item in n2q_group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert ("111001", "n2q") in texts and ("111003", "0.3.1") in texts
    assert ("111002", f"weights_sha256={N2Q.weights_sha256}") in texts
    classical_texts = {
        item.ConceptNameCodeSequence[0].CodeValue
        for item in series_groups["Series QA: ctqa-classical"][0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert "111002" not in classical_texts  # no weights, no checksum parameter


def test_qualitative_evaluations(written) -> None:
    _, ds, _ = written
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    evals = {
        (q.name.value, q.value.value)
        for q in groups["Series QA: ctqa-classical"].get_qualitative_evaluations()
    }
    assert evals == {
        (metric_code("global_noise_hu").concept.value, WITHIN_CONTROL_LIMITS.value),
        (metric_code("ssde_mgy").concept.value, OUTSIDE_CONTROL_LIMITS.value),
    }
    assert groups["Series QA: n2q"].get_qualitative_evaluations() == []


def test_per_slice_measurements_reference_their_image(headers, written) -> None:
    _, ds, slices = written
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    noise = groups["Per slice: global_noise_hu (ctqa-classical)"].get_measurements()
    assert len(noise) == len(headers)
    for i, (m, h) in enumerate(zip(noise, headers)):
        refs = m.referenced_images
        assert len(refs) == 1
        assert refs[0].referenced_sop_instance_uid == h.SOPInstanceUID
        assert refs[0].referenced_sop_class_uid == h.SOPClassUID
        assert refs[0].referenced_frame_numbers is None
        assert m.value == 3.0 + 0.125 * i
    ctdi = groups["Per slice: ctdivol_mgy (ctqa-classical)"].get_measurements()
    assert len(ctdi) == len(headers) - 1  # the nan slice is left out
    assert headers[5].SOPInstanceUID not in {m.referenced_images[0].referenced_sop_instance_uid for m in ctdi}


def test_read_back_equals_what_was_put_in(written, series_metrics) -> None:
    _, ds, slices = written
    content = read_measurement_report(ds)
    assert sorted(content.series_metrics, key=repr) == sorted(series_metrics, key=repr)
    assert sorted(content.slice_metrics, key=repr) == sorted(slices, key=repr)


def test_multiframe_source_frame_references() -> None:
    ect = enhanced_ct_header()
    algo = AlgorithmId("ctqa-classical", "1.2.0")
    slices = [
        SliceMetricValue("global_noise_hu", 7.5, ect.SOPClassUID, ect.SOPInstanceUID, algo, frame_number=2),
        SliceMetricValue("global_noise_hu", 6.25, ect.SOPClassUID, ect.SOPInstanceUID, algo, frame_number=1),
    ]
    sr = build_measurement_report(
        [ect, ect], [MetricValue("global_noise_hu", 6.875, algo)], slices, series_number=12
    )
    ds = roundtrip(sr)
    assert ds.StudyInstanceUID == ect.StudyInstanceUID
    assert_patient_study_copied(ds, ect)
    back = read_measurement_report(ds)
    assert set(back.slice_metrics) == set(slices)
    with pytest.raises(ValueError, match="frames 1..2"):
        build_measurement_report(
            [ect],
            [],
            [SliceMetricValue("global_noise_hu", 1.0, ect.SOPClassUID, ect.SOPInstanceUID, algo, frame_number=3)],
            series_number=12,
        )


def test_evaluations_argument(headers) -> None:
    m = [MetricValue("global_noise_hu", 5.0, CLASSICAL)]
    ds = build_measurement_report(headers, m, [], series_number=5, evaluations={"global_noise_hu": Evaluation.OUTSIDE})
    assert read_measurement_report(ds).series_metrics[0].evaluation is Evaluation.OUTSIDE
    with pytest.raises(ValueError, match="contradicts"):
        build_measurement_report(
            headers,
            [MetricValue("global_noise_hu", 5.0, CLASSICAL, Evaluation.WITHIN)],
            [],
            series_number=5,
            evaluations={"global_noise_hu": Evaluation.OUTSIDE},
        )
    with pytest.raises(ValueError, match="not in \"series_metrics\""):
        build_measurement_report(headers, m, [], series_number=5, evaluations={"wed_cm": Evaluation.WITHIN})


def test_bad_input_is_rejected_with_named_argument(headers) -> None:
    m = [MetricValue("global_noise_hu", 5.0, CLASSICAL)]
    with pytest.raises(ValueError, match="Unknown metric key"):
        build_measurement_report(headers, [MetricValue("bogus", 1.0, CLASSICAL)], [], series_number=1)
    with pytest.raises(ValueError, match="series_number"):
        build_measurement_report(headers, m, [], series_number=0)
    with pytest.raises(ValueError, match="source_images"):
        build_measurement_report([], m, [], series_number=1)
    with pytest.raises(ValueError, match="twice"):
        build_measurement_report(headers, m + m, [], series_number=1)
    with pytest.raises(ValueError, match="not among"):
        build_measurement_report(
            headers, m, [SliceMetricValue("global_noise_hu", 1.0, headers[0].SOPClassUID, "1.2.3.4", CLASSICAL)],
            series_number=1,
        )
    other = copy.deepcopy(headers[0])
    other.StudyInstanceUID = "1.2.3.999"
    other.SOPInstanceUID = "1.2.3.999.1"
    with pytest.raises(ValueError, match="one study"):
        build_measurement_report([headers[0], other], m, [], series_number=1)
    with pytest.raises(ValueError, match="finite"):
        MetricValue("global_noise_hu", float("nan"), CLASSICAL)
    with pytest.raises(ValueError, match="weights_sha256"):
        AlgorithmId("n2q", "1", "ABC")


def test_no_patient_identifiers_in_logs_or_warnings(headers, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_measurement_report(headers, [MetricValue("wed_cm", 17.0, CLASSICAL)], [], series_number=2)
    name, pid = str(headers[0].PatientName), str(headers[0].PatientID)
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert texts, "expected at least the builder's own log line"
    for t in texts:
        assert f'"{name}"' not in t and pid not in t, t


def test_helpers_for_wiring() -> None:
    got = metrics_from_mapping(
        {"global_noise_hu": 4.5, "ssde_mgy": None, "wed_cm": 17}, CLASSICAL, {"global_noise_hu": Evaluation.WITHIN}
    )
    assert got == [
        MetricValue("global_noise_hu", 4.5, CLASSICAL, Evaluation.WITHIN),
        MetricValue("wed_cm", 17.0, CLASSICAL),
    ]
    with pytest.raises(ValueError, match="one value per slice"):
        slice_metrics_from_array("wed_cm", [1.0, 2.0], ["1.2"], ["1.2.3"], [None], CLASSICAL)
    a, b = derived_uids("1.2.3.4", "sr"), derived_uids("1.2.3.4", "sr")
    assert a == b and a[0] != a[1]
    assert derived_uids("1.2.3.4", "sr", 2) != a and derived_uids("1.2.3.4", "pdf") != a
    assert all(len(u) <= 64 and re.fullmatch(r"[0-9.]+", u) for u in a)


def test_control_limits_written_as_normal_range(written) -> None:
    _, ds, _ = written
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    group = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}["Series QA: ctqa-classical"]
    noise = group.get_measurements(name=metric_code("global_noise_hu").concept)[0]
    props = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ValueType): item
        for item in noise[0].ContentSequence
        if item.RelationshipType == "HAS PROPERTIES"
    }
    lower, upper = props[("385524004", "NUM")], props[("371933006", "NUM")]
    assert float(lower.MeasuredValueSequence[0].NumericValue) == 3.9
    assert float(upper.MeasuredValueSequence[0].NumericValue) == 5.6
    assert upper.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    assert props[("121407", "TEXT")].TextValue == "Trend control limits of this scanner and protocol"
    wed = group.get_measurements(name=metric_code("wed_cm").concept)[0]
    assert not any(i.RelationshipType == "HAS PROPERTIES" for i in wed[0].get("ContentSequence", []))


def test_control_limits_evaluate_and_validate() -> None:
    cl = ControlLimits(3.9, 5.6)
    assert cl.evaluate(3.9) is Evaluation.WITHIN and cl.evaluate(5.61) is Evaluation.OUTSIDE
    assert ControlLimits(None, 30.0).evaluate(-1e9) is Evaluation.WITHIN
    with pytest.raises(ValueError, match="both None"):
        ControlLimits(None, None)
    with pytest.raises(ValueError, match="must not exceed"):
        ControlLimits(5.0, 4.0)


def test_not_computed_metrics_and_omitted_outputs_are_said_with_the_reason(headers) -> None:
    sr = roundtrip(build_measurement_report(
        headers, [MetricValue("wed_cm", 17.0, CLASSICAL)], series_number=9001,
        series_description="CT QA measurements, series 201 STD BRAIN 5MM",
        not_computed={"global_noise_hu": "not measurable in any slice: too few soft-tissue pixels",
                      "ssde_mgy": "no CTDIvol in the series"},
        omitted_outputs=[("pmap:local_noise_sd", "the source has no FrameOfReferenceUID"),
                         ("pdf", "RuntimeError: boom")],
    ))
    assert sr.SeriesDescription == "CT QA measurements, series 201 STD BRAIN 5MM"
    assert read_notes(sr) == {
        "global_noise_hu": "not computed: not measurable in any slice: too few soft-tissue pixels",
        "ssde_mgy": "not computed: no CTDIvol in the series",
        "output": "Parametric Map local_noise_sd not produced: the source has no FrameOfReferenceUID | "
                  "Readable report (PDF) not produced: RuntimeError: boom",
    }
    # TID 1500 row 12 (UMLS C0034375) after Imaging Measurements (DCM 126010); each note names the metric
    root = [(item.ConceptNameCodeSequence[0].CodingSchemeDesignator, item.ConceptNameCodeSequence[0].CodeValue)
            for item in sr.ContentSequence]
    assert root[-1] == ("UMLS", "C0034375") and root.index(("DCM", "126010")) == len(root) - 2
    notes = sr.ContentSequence[-1].ContentSequence
    assert notes[0].ConceptNameCodeSequence[0].CodeValue == metric_code("global_noise_hu").concept.value
    assert notes[0].RelationshipType == "CONTAINS" and notes[0].ValueType == "TEXT"
    # the measured value is still a measurement; the not-computed ones are not
    assert [m.key for m in read_measurement_report(sr).series_metrics] == ["wed_cm"]
    assert hd.sr.Comprehensive3DSR.from_dataset(sr).content is not None


def _tracking_uids(ds) -> dict[str, str]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    return {g.tracking_identifier: g.tracking_uid for g in sr.content.get_image_measurement_groups()}


def test_tracking_uids_are_stable_per_series_and_group(written, headers, series_metrics) -> None:
    """A re-analysis's SR (new SOP Instance UID) tracks the same groups under the same Tracking
    Unique Identifiers; another series' groups get others; every one a valid UID."""
    sr, ds, slices = written
    first = _tracking_uids(ds)
    assert set(first) == {"Series QA: ctqa-classical", "Series QA: n2q", "Per slice: global_noise_hu (ctqa-classical)",
                          "Per slice: ctdivol_mgy (ctqa-classical)"}
    assert len(set(first.values())) == 4
    for uid in first.values():
        assert re.fullmatch(r"[1-9]\d*(\.(0|[1-9]\d*))+", uid) and len(uid) <= 64, uid
    again = build_measurement_report(headers, series_metrics, slices, series_number=9001, instance_number=3)
    assert again.SOPInstanceUID != sr.SOPInstanceUID
    assert _tracking_uids(roundtrip(again)) == first
    other = copy.deepcopy(headers)
    for h in other:
        h.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    moved = [SliceMetricValue(s.key, s.value, s.sop_class_uid, s.sop_instance_uid, s.algorithm) for s in slices]
    theirs = _tracking_uids(roundtrip(build_measurement_report(other, series_metrics, moved, series_number=9001)))
    assert set(theirs) == set(first) and not set(theirs.values()) & set(first.values())
