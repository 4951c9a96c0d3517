"""The measurement report builder as it was before the SR build was made fast (reports/sr.py at
commit 9017624): every item built by highdicom's templates, the image library by highdicom's
ImageLibrary, the document by Comprehensive3DSR from the whole content tree. Kept for
tests/unit/test_sr_build.py and bench/outputs_speed.py, which compare its SR with the one
reports.sr builds now; not used by the node. Not a test module.

The body of ``build_measurement_report_reference`` is the old function unchanged except that the
helpers it shares with reports.sr are reached through that module (``_sr.``), and that its tracking
UIDs come from ``_sr.tracking_uid`` (they were random then; both builds now derive them the same way).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import pydicom

from highdicom.sr import (
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset

from reports import sr as _sr
from reports.codes import OUTPUT_NOT_PRODUCED, PROCEDURE_IMAGE_QUALITY_ANALYSIS, QUALITATIVE_EVALUATIONS
from reports.codes import evaluation_code, metric_code, private_coding_scheme
from reports.common import new_instance_arguments, no_person_name_warnings, prepare_sources
from reports.inputs import AlgorithmId, DeviceInfo, Evaluation, MetricValue, SliceMetricValue

_cc = _sr._cc
_text = _sr._text
_output_name = _sr._output_name
SERIES_GROUP_PREFIX = _sr.SERIES_GROUP_PREFIX
SLICE_GROUP_PREFIX = _sr.SLICE_GROUP_PREFIX


def build_measurement_report_reference(
    source_images: Sequence[Dataset],
    series_metrics: Sequence[MetricValue],
    slice_metrics: Sequence[SliceMetricValue] = (),
    *,
    series_number: int,
    instance_number: int = 1,
    evaluations: Mapping[str, Evaluation] | None = None,
    device: DeviceInfo | None = None,
    series_description: str = "CT QA measurements",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    not_computed: Mapping[str, str] | None = None,
    omitted_outputs: Sequence[tuple[str, str]] = (),
) -> Comprehensive3DSR:
    """``reports.sr.build_measurement_report`` as it was (same arguments, same checks, same SR)."""
    if not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f'Argument "series_number" must be a positive int, got {series_number!r}')
    if not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f'Argument "instance_number" must be a positive int, got {instance_number!r}')
    not_computed = dict(not_computed or {})
    if not series_metrics and not slice_metrics and not not_computed:
        raise ValueError('Arguments "series_metrics" and "slice_metrics" are both empty: nothing to report')
    device = device or DeviceInfo()
    sources = prepare_sources(source_images)
    index = _sr._source_index(sources)

    seen: set[tuple[str, AlgorithmId]] = set()
    for m in series_metrics:
        metric_code(m.key)  # unknown key -> ValueError
        if (m.key, m.algorithm) in seen:
            raise ValueError(f'Argument "series_metrics" holds metric "{m.key}" of {m.algorithm.name} twice')
        seen.add((m.key, m.algorithm))
    seen_slices: set[tuple[str, AlgorithmId, str, int | None]] = set()
    for s in slice_metrics:
        metric_code(s.key)
        _sr._check_slice_reference(s, index)
        k = (s.key, s.algorithm, s.sop_instance_uid, s.frame_number)
        if k in seen_slices:
            raise ValueError(
                f'Argument "slice_metrics" holds "{s.key}" of {s.algorithm.name} twice for image '
                f"{s.sop_instance_uid} frame {s.frame_number}"
            )
        seen_slices.add(k)

    groups: list[MeasurementsAndQualitativeEvaluations] = []

    # series-level: one group per algorithm, in order of first appearance
    by_algo: dict[AlgorithmId, list[tuple[MetricValue, Evaluation | None]]] = {}
    for m, ev in _sr._merge_evaluations(series_metrics, evaluations):
        by_algo.setdefault(m.algorithm, []).append((m, ev))
    for algo, items in by_algo.items():
        algo_id = _sr.algorithm_identification(algo)
        measurements = []
        qualitative = []
        for m, ev in items:
            mc = metric_code(m.key)
            measurements.append(
                Measurement(
                    name=_cc(mc.concept),
                    value=float(m.value),
                    unit=_cc(mc.unit),
                    algorithm_id=algo_id,
                    properties=_sr._limits_properties(m.control_limits, mc.unit) if m.control_limits else None,
                )
            )
            if ev is not None:
                qualitative.append(
                    QualitativeEvaluation(name=_cc(mc.concept), value=_cc(evaluation_code(ev is Evaluation.WITHIN)))
                )
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=_sr.tracking_uid(sources, f"{SERIES_GROUP_PREFIX}{algo.name}"),
                                                       identifier=f"{SERIES_GROUP_PREFIX}{algo.name}"),
                algorithm_id=algo_id,
                measurements=measurements,
                qualitative_evaluations=qualitative or None,
            )
        )

    # per-slice: one group per (algorithm, key)
    by_key: dict[tuple[AlgorithmId, str], list[SliceMetricValue]] = {}
    for s in slice_metrics:
        by_key.setdefault((s.algorithm, s.key), []).append(s)
    for (algo, key), items in by_key.items():
        algo_id = _sr.algorithm_identification(algo)
        mc = metric_code(key)
        measurements = [
            Measurement(
                name=_cc(mc.concept),
                value=float(s.value),
                unit=_cc(mc.unit),
                # no per-measurement TID 4019 here: the group carries it (one per slice would be
                # thousands of repeated items for a long series)
                referenced_images=[
                    SourceImageForMeasurement(
                        referenced_sop_class_uid=s.sop_class_uid,
                        referenced_sop_instance_uid=s.sop_instance_uid,
                        referenced_frame_numbers=[s.frame_number] if s.frame_number is not None else None,
                    )
                ],
            )
            for s in items
        ]
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=_sr.tracking_uid(sources, f"{SLICE_GROUP_PREFIX}{key} ({algo.name})"),
                    identifier=f"{SLICE_GROUP_PREFIX}{key} ({algo.name})"
                ),
                algorithm_id=algo_id,
                measurements=measurements,
            )
        )

    report = MeasurementReport(
        observation_context=_sr._observation_context(device),
        procedure_reported=_cc(PROCEDURE_IMAGE_QUALITY_ANALYSIS),
        imaging_measurements=groups,
        referenced_images=[_sr._library_view(ds) for ds in sources],
    )
    notes = [
        TextContentItem(name=_cc(metric_code(key).concept), value=_text(f"not computed: {why}"),
                        relationship_type=RelationshipTypeValues.CONTAINS)
        for key, why in not_computed.items()
    ] + [
        TextContentItem(name=_cc(OUTPUT_NOT_PRODUCED), value=_text(f"{_output_name(kind)} not produced: {why}"),
                        relationship_type=RelationshipTypeValues.CONTAINS)
        for kind, why in omitted_outputs
    ]
    if notes:
        container = ContainerContentItem(name=_cc(QUALITATIVE_EVALUATIONS),
                                         relationship_type=RelationshipTypeValues.CONTAINS)
        container.ContentSequence = ContentSequence(notes)
        report[0].ContentSequence.append(container)
    with no_person_name_warnings():
        sr = Comprehensive3DSR(
            evidence=sources,
            content=report,
            **new_instance_arguments(device, series_instance_uid=series_instance_uid, series_number=series_number,
                                     sop_instance_uid=sop_instance_uid, instance_number=instance_number),
            is_complete=True,
            is_final=True,
            is_verified=False,
            institution_name=device.institution_name,
            institutional_department_name=device.institutional_department_name,
            coding_schemes=[private_coding_scheme()],
            series_description=series_description,
        )
    if device.station_name:
        sr.StationName = device.station_name
    return sr


# --- comparing two SRs ---------------------------------------------------------------------------

#: Set from the clock when an SR is built (and ContributionDateTime in the Contributing Equipment
#: Sequence): made the same in both SRs before they are compared.
CLOCK_KEYWORDS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")


def encoded(sr: Dataset) -> bytes:
    """The SR as written (DICOM file format), its clock-set attributes fixed."""
    for kw in CLOCK_KEYWORDS:
        if kw in sr:
            sr[kw].value = {"Date": "20000101", "Time": "000000"}[kw[-4:]]
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20000101000000"
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def content_rows(ds: Dataset, path: str = "") -> list[tuple[str, str, str]]:
    """Every element of ``ds`` and of its sequences, depth first: (path, VR, value)."""
    rows: list[tuple[str, str, str]] = []
    for elem in ds:
        p = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            rows.append((p, "SQ", f"{len(elem.value)} item(s)"))
            for i, item in enumerate(elem.value):
                rows += content_rows(item, f"{p}[{i}].")
        else:
            rows.append((p, elem.VR, repr(elem.value)))
    return rows


def read_back(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def first_difference(a: list, b: list) -> str:
    """Where two row lists part (index, both rows), or the empty string when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"row {i}: {x} != {y}"
    return "" if len(a) == len(b) else f"{len(a)} rows != {len(b)} rows"
