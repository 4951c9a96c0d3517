"""TID 1500 Measurement Report (Comprehensive 3D SR) of one analysed series, built with highdicom.

Layout of the content tree (PS3.16 TID 1500):

- Observation context: our node as the device observer (TID 1004).
- Procedure reported: SCT 133887000 "Image quality analysis".
- Image library (TID 1600): every analysed source image.
- Imaging measurements: one TID 1501 "Measurement and Qualitative Evaluation Group" per algorithm
  for the series-level metrics (tracking identifier "Series QA: <algorithm>"), with TID 4019
  algorithm identification on the group and on each TID 300 measurement; where a metric has a
  control-limit evaluation, a qualitative evaluation named by the metric's concept with the value
  99CTQA WITHIN_CL / OUTSIDE_CL.
- Per-slice metrics: one TID 1501 group per (algorithm, metric) (tracking identifier
  "Per slice: <key> (<algorithm>)") with TID 4019 on the group only; each TID 300 measurement
  references its image (and frame) as "Source of measurement".

The SR goes into the source study: highdicom copies the Patient, General Study and Patient Study
modules from the first source header and lists all sources in the Current Requested Procedure
Evidence Sequence. The private scheme 99CTQA is declared in the Coding Scheme Identification Sequence.

Speed (a long series has thousands of per-slice items): the document is the one highdicom's
templates and Comprehensive3DSR make, byte for byte (tests/unit/test_sr_build.py builds both), but
Comprehensive3DSR is handed the root container alone (it would deep-copy and re-read the whole tree:
``_root_without_children``), the image library shares the descriptors equal across a series'
images (``_image_library``), and a per-slice group builds its concept name and unit once.
``bench/outputs_speed.py`` prints the time against the builder before (tests/unit/sr_reference.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementProperties,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NormalRangeProperties,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    TextContentItem,
    UIDRefContentItem,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from reports.codes import (
    CATALOGUE,
    OUTPUT_NOT_PRODUCED,
    PROCEDURE_IMAGE_QUALITY_ANALYSIS,
    QUALITATIVE_EVALUATIONS,
    SERIES_NOTE,
    evaluation_code,
    metric_code,
    private_coding_scheme,
)
from reports.common import (
    is_multiframe,
    n_frames,
    new_instance_arguments,
    no_person_name_warnings,
    prepare_sources,
    stable_uid,
)
from reports.inputs import AlgorithmId, ControlLimits, DeviceInfo, Evaluation, MetricValue, SliceMetricValue

logger = logging.getLogger(__name__)

SERIES_GROUP_PREFIX = "Series QA: "
SLICE_GROUP_PREFIX = "Per slice: "


def _cc(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def algorithm_identification(algorithm: AlgorithmId) -> AlgorithmIdentification:
    """TID 4019: name, version and (for a learned model) the weights checksum as a parameter."""
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=algorithm.parameters or None
    )


def _observation_context(device: DeviceInfo) -> ObservationContext:
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=stable_uid("ctqa-node-device", device.manufacturer, device.device_serial_number),
                name=device.model_name,
                manufacturer_name=device.manufacturer,
                model_name=device.model_name,
                serial_number=device.device_serial_number,
            ),
        )
    )


def _functional_group_attr(ds: Dataset, sequence: str, keyword: str):
    """First value of ``keyword`` in functional group ``sequence`` (shared, else first frame), or None."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups, [])[:1]:
            for item in group.get(sequence, [])[:1]:
                if keyword in item:
                    return item[keyword].value
    return None


def _library_view(ds: Dataset) -> Dataset:
    """The header as highdicom's TID 1602 image library entry wants it.

    A multi-frame image keeps spacing, orientation and position in functional groups; the library
    entry (descriptive only) gets them at the root, position from the first frame.
    """
    if not is_multiframe(ds) or "PixelSpacing" in ds:
        return _geometry_checked(ds)
    view = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID", "Modality"):
        if kw in ds:
            view[kw] = ds[kw]
    for seq, kw in (
        ("PixelMeasuresSequence", "PixelSpacing"),
        ("PixelMeasuresSequence", "SliceThickness"),
        ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PlanePositionSequence", "ImagePositionPatient"),
    ):
        value = _functional_group_attr(ds, seq, kw)
        if value is None:
            return _geometry_checked(ds)
        setattr(view, kw, value)
    return _geometry_checked(view)


_GEOMETRY = (("PixelSpacing", 2), ("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("SliceThickness", 1))


def _geometry_checked(ds: Dataset) -> Dataset:
    """``ds``, or, where the TID 1604 geometry descriptors (all optional) cannot be made from it
    (SliceThickness absent or empty, as anonymised and older series have it), a view that gives
    highdicom only the descriptors it has: modality, Frame of Reference, rows and columns."""
    for kw, n in _GEOMETRY:
        v = ds.get(kw)
        values = [] if v in (None, "") else (list(v) if n > 1 else [v])
        if len(values) != n or any(not isinstance(x, (int, float)) for x in values):
            view = Dataset()
            for k in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID", "NumberOfFrames"):
                if k in ds:
                    view[k] = ds[k]
            view.Modality = ""  # no cross-sectional descriptors
            return view
    return ds


# The TID 1602/1604 descriptors highdicom writes for a cross-sectional (CT, MR, PT) image, by DCM
# code value: (header keyword, index into its value or None). The Modality (121139) is the same for
# every image of one SOP class.
_DESCRIPTORS: dict[str, tuple[str, int | None]] = {
    "121139": ("SOPClassUID", None),
    "112227": ("FrameOfReferenceUID", None),
    "110910": ("Rows", None),
    "110911": ("Columns", None),
    "111026": ("PixelSpacing", 1),
    "111066": ("PixelSpacing", 0),
    "112225": ("SliceThickness", None),
    "110901": ("ImagePositionPatient", 0),
    "110902": ("ImagePositionPatient", 1),
    "110903": ("ImagePositionPatient", 2),
    "110904": ("ImageOrientationPatient", 0),
    "110905": ("ImageOrientationPatient", 1),
    "110906": ("ImageOrientationPatient", 2),
    "110907": ("ImageOrientationPatient", 3),
    "110908": ("ImageOrientationPatient", 4),
    "110909": ("ImageOrientationPatient", 5),
    "112226": ("SpacingBetweenSlices", None),
}
_SOURCE = CodedConcept("260753009", "SCT", "Source")  # the concept name of highdicom's library entries


def _descriptor_value(ds: Dataset, code_value: str):
    keyword, i = _DESCRIPTORS[code_value]
    value = ds[keyword].value
    return value if i is None else value[i]


def _value_key(value) -> tuple:
    """What a descriptor made from ``value`` depends on (highdicom writes DS from str, FD if a float)."""
    return type(value), str(value)


def _entry_descriptors(ds: Dataset, templates: dict) -> list[ContentItem]:
    """TID 1602 descriptors of one image, the items highdicom's ImageLibraryEntryDescriptors makes.

    highdicom builds the descriptors of the first image of each kind (SOP class, modality, which
    optional attributes it has); the next images of that kind get the same item objects where their
    value is the same (pixel spacing, orientation, ... of one series: written, they are the same
    bytes; nothing changes an item once built) and a new item of the same concept and unit where it
    is not (the position). Building every item anew for each image of a long series was most of the
    time the image library took. A kind this does not know (not cross-sectional, a descriptor not in
    ``_DESCRIPTORS``) gets highdicom's items for each image.
    """
    kind = (str(ds.SOPClassUID), str(ds.get("Modality", "")), "FrameOfReferenceUID" in ds,
            "SpacingBetweenSlices" in ds)
    first = templates.get(kind)
    if first is None:
        items = list(ImageLibraryEntryDescriptors(ds))
        codes_ = [(i.name.scheme_designator, i.name.value) for i in items]
        if kind[1] not in ("CT", "MR", "PT") or any(s != "DCM" or v not in _DESCRIPTORS for s, v in codes_):
            return items  # not a kind built here: highdicom's items for every image of it
        templates[kind] = [(item, _value_key(_descriptor_value(ds, v))) for item, (_, v) in zip(items, codes_)]
        return items
    out: list[ContentItem] = []
    for item, key in first:
        value = _descriptor_value(ds, item.name.value)
        if _value_key(value) == key:
            out.append(item)
        elif item.ValueType == "NUM":
            out.append(NumContentItem(name=item.name, value=value, unit=item.unit,
                                      relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT))
        else:  # UIDREF: the Frame of Reference
            out.append(UIDRefContentItem(name=item.name, value=value,
                                         relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT))
    return out


def _image_library(views: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library of the ``views`` (see ``_library_view``): the content highdicom's
    ImageLibrary template makes, item for item (tests/unit/test_sr_build.py compares the two), with
    the descriptors that are equal for the images of a series built once (``_entry_descriptors``).
    Like highdicom's, a group (one per modality and Frame of Reference) holds no Frame of Reference
    item of its own: each entry has one."""
    templates: dict = {}
    groups: dict[tuple, list[ImageContentItem]] = {}
    for ds in views:
        image_item = ImageContentItem(name=_SOURCE, referenced_sop_instance_uid=ds.SOPInstanceUID,
                                      referenced_sop_class_uid=ds.SOPClassUID,
                                      relationship_type=RelationshipTypeValues.CONTAINS)
        descriptors = _entry_descriptors(ds, templates)
        image_item.ContentSequence = descriptors
        modality = descriptors[0].value  # TID 1602 starts with the Modality
        key = (modality.scheme_designator, modality.value) + (
            (str(ds.FrameOfReferenceUID),) if "FrameOfReferenceUID" in ds else ())
        groups.setdefault(key, []).append(image_item)
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence()
    for image_items in groups.values():
        group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
        group.ContentSequence = image_items
        library.ContentSequence.append(group)
    return library


_LOWER_LIMIT = Code("385524004", "SCT", "Normal Range Lower Limit")
_UPPER_LIMIT = Code("371933006", "SCT", "Normal Range Upper Limit")
_RANGE_DESCRIPTION = Code("121407", "DCM", "Normal Range description")


def _limits_properties(limits: ControlLimits, unit: Code) -> MeasurementProperties:
    """Control limits as the measurement's TID 310/312 normal range (lower/upper limit, description)."""
    values = [
        NumContentItem(
            name=_cc(code), value=float(v), unit=_cc(unit), relationship_type=RelationshipTypeValues.HAS_PROPERTIES
        )
        for code, v in ((_LOWER_LIMIT, limits.lower), (_UPPER_LIMIT, limits.upper))
        if v is not None
    ]
    return MeasurementProperties(
        normal_range_properties=NormalRangeProperties(values=values, description=limits.description)
    )


def _limits_of(item: Dataset) -> ControlLimits | None:
    """TID 312 normal range below a NUM content item -> ControlLimits, or None."""
    lower = upper = None
    description = None
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0]
        key = (name.CodingSchemeDesignator, name.CodeValue)
        if child.ValueType == "NUM" and key in (("SCT", _LOWER_LIMIT.value), ("SCT", _UPPER_LIMIT.value)):
            mv = child.MeasuredValueSequence[0]
            v = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
            if key[1] == _LOWER_LIMIT.value:
                lower = v
            else:
                upper = v
        elif child.ValueType == "TEXT" and key == ("DCM", _RANGE_DESCRIPTION.value):
            description = str(child.TextValue)
    if lower is None and upper is None:
        return None
    return ControlLimits(lower, upper, description) if description else ControlLimits(lower, upper)


def _merge_evaluations(
    series_metrics: Sequence[MetricValue], evaluations: Mapping[str, Evaluation] | None
) -> list[tuple[MetricValue, Evaluation | None]]:
    evaluations = dict(evaluations or {})
    keys = {m.key for m in series_metrics}
    unknown = sorted(set(evaluations) - keys)
    if unknown:
        raise ValueError(f'Argument "evaluations" names metrics that are not in "series_metrics": {unknown}')
    out: list[tuple[MetricValue, Evaluation | None]] = []
    for m in series_metrics:
        ev = m.evaluation
        extra = evaluations.get(m.key)
        if extra is not None:
            extra = Evaluation(extra)
            if ev is not None and ev != extra:
                raise ValueError(
                    f'Metric "{m.key}": evaluation {ev.value!r} on the MetricValue contradicts '
                    f'{extra.value!r} in argument "evaluations"'
                )
            ev = extra
        out.append((m, ev))
    return out


def tracking_uid(sources: Sequence[Dataset], identifier: str) -> str:
    """The Tracking Unique Identifier of a measurement group: derived from the analysed series
    and the group's tracking identifier, so the same finding keeps its UID in every SR of that
    series (a re-analysis that supersedes an SR tracks the same groups, as TID 1500 intends)."""
    series = sorted({str(ds.SeriesInstanceUID) for ds in sources})
    return stable_uid("ctqa-tracking", *series, identifier)


def _tracking(sources: Sequence[Dataset], identifier: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=tracking_uid(sources, identifier), identifier=identifier)


def _source_index(sources: Sequence[Dataset]) -> dict[str, tuple[str, int | None]]:
    """SOPInstanceUID -> (SOPClassUID, number of frames or None for single-frame)."""
    return {
        str(ds.SOPInstanceUID): (str(ds.SOPClassUID), n_frames(ds) if is_multiframe(ds) else None) for ds in sources
    }


def _check_slice_reference(s: SliceMetricValue, index: Mapping[str, tuple[str, int | None]]) -> None:
    if s.sop_instance_uid not in index:
        raise ValueError(
            f'Slice metric "{s.key}" references SOP instance {s.sop_instance_uid}, which is not among '
            '"source_images"'
        )
    sop_class, frames = index[s.sop_instance_uid]
    if s.sop_class_uid != sop_class:
        raise ValueError(
            f'Slice metric "{s.key}" gives SOP class {s.sop_class_uid} for {s.sop_instance_uid}, '
            f"the source has {sop_class}"
        )
    if frames is None and s.frame_number is not None:
        raise ValueError(
            f'Slice metric "{s.key}": frame_number {s.frame_number} given for single-frame image {s.sop_instance_uid}'
        )
    if frames is not None and (s.frame_number is None or not 1 <= s.frame_number <= frames):
        raise ValueError(
            f'Slice metric "{s.key}": multi-frame image {s.sop_instance_uid} has frames 1..{frames}, '
            f"got frame_number {s.frame_number!r}"
        )


def build_measurement_report(
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
    series_notes: Sequence[str] = (),
    previous_versions: Sequence[Dataset] = (),
) -> Comprehensive3DSR:
    """Build the TID 1500 Measurement Report SR of one analysed series.

    ``source_images``: headers (PixelData may be absent) of the analysed images, all of one study;
    a multi-frame header repeated per frame is fine. ``series_metrics``: at most one value per
    (key, algorithm). ``slice_metrics``: each must reference one of ``source_images``.
    ``evaluations``: metric key -> within/outside control limits (alternative to
    ``MetricValue.evaluation``; the two must not contradict). ``not_computed``: metric key -> why
    it has no value, and ``omitted_outputs``: (output kind, why it was not produced): each a TEXT
    item in the TID 1500 "Qualitative Evaluations" container (the metric's own concept, resp.
    99CTQA OUTPUT_OMITTED), so a reader sees why a value or a map is missing; ``series_notes``:
    what a reader must know of the source series (a slice gap), TEXT items 99CTQA SERIES_NOTE
    there too (``analysis.volume.series_notes``). ``previous_versions``: the reports this one
    replaces (headers with SOP Class/Instance, Series and Study UIDs), referenced in its Predecessor
    Documents Sequence. Returns a highdicom
    ``Comprehensive3DSR`` (a pydicom Dataset with file meta) ready for ``save_as``.
    """
    if not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f'Argument "series_number" must be a positive int, got {series_number!r}')
    if not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f'Argument "instance_number" must be a positive int, got {instance_number!r}')
    not_computed = dict(not_computed or {})
    if not series_metrics and not slice_metrics and not not_computed:
        raise ValueError('Arguments "series_metrics" and "slice_metrics" are both empty: nothing to report')
    device = device or DeviceInfo()
    sources = prepare_sources(source_images)
    index = _source_index(sources)

    seen: set[tuple[str, AlgorithmId]] = set()
    for m in series_metrics:
        metric_code(m.key)  # unknown key -> ValueError
        if (m.key, m.algorithm) in seen:
            raise ValueError(f'Argument "series_metrics" holds metric "{m.key}" of {m.algorithm.name} twice')
        seen.add((m.key, m.algorithm))
    seen_slices: set[tuple[str, AlgorithmId, str, int | None]] = set()
    for s in slice_metrics:
        metric_code(s.key)
        _check_slice_reference(s, index)
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
    for m, ev in _merge_evaluations(series_metrics, evaluations):
        by_algo.setdefault(m.algorithm, []).append((m, ev))
    for algo, items in by_algo.items():
        algo_id = algorithm_identification(algo)
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
                    properties=_limits_properties(m.control_limits, mc.unit) if m.control_limits else None,
                )
            )
            if ev is not None:
                qualitative.append(
                    QualitativeEvaluation(name=_cc(mc.concept), value=_cc(evaluation_code(ev is Evaluation.WITHIN)))
                )
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sources, f"{SERIES_GROUP_PREFIX}{algo.name}"),
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
        algo_id = algorithm_identification(algo)
        mc = metric_code(key)
        # one concept name and one unit item for the whole group: highdicom puts a given
        # CodedConcept in as it is, so each measurement need not build its own copy of the same code
        name, unit = _cc(mc.concept), _cc(mc.unit)
        measurements = [
            Measurement(
                name=name,
                value=float(s.value),
                unit=unit,
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
                tracking_identifier=_tracking(sources, f"{SLICE_GROUP_PREFIX}{key} ({algo.name})"),
                algorithm_id=algo_id,
                measurements=measurements,
            )
        )

    report = MeasurementReport(
        observation_context=_observation_context(device),
        procedure_reported=_cc(PROCEDURE_IMAGE_QUALITY_ANALYSIS),
        imaging_measurements=groups,
    )
    # the Image Library goes where highdicom's MeasurementReport puts it: before the measurements
    report[0].ContentSequence.insert(len(report[0].ContentSequence) - 1,
                                     _image_library([_library_view(ds) for ds in sources]))
    notes = [
        TextContentItem(name=_cc(metric_code(key).concept), value=_text(f"not computed: {why}"),
                        relationship_type=RelationshipTypeValues.CONTAINS)
        for key, why in not_computed.items()
    ] + [
        TextContentItem(name=_cc(OUTPUT_NOT_PRODUCED), value=_text(f"{_output_name(kind)} not produced: {why}"),
                        relationship_type=RelationshipTypeValues.CONTAINS)
        for kind, why in omitted_outputs
    ] + [
        TextContentItem(name=_cc(SERIES_NOTE), value=_text(note), relationship_type=RelationshipTypeValues.CONTAINS)
        for note in series_notes
    ]
    if notes:
        container = ContainerContentItem(name=_cc(QUALITATIVE_EVALUATIONS),
                                         relationship_type=RelationshipTypeValues.CONTAINS)
        container.ContentSequence = ContentSequence(notes)
        report[0].ContentSequence.append(container)
    root = report[0]
    with no_person_name_warnings():
        sr = Comprehensive3DSR(
            evidence=sources,
            content=_root_without_children(root),
            **new_instance_arguments(device, series_instance_uid=series_instance_uid, series_number=series_number,
                                     sop_instance_uid=sop_instance_uid, instance_number=instance_number),
            is_complete=True,
            is_final=True,
            is_verified=False,
            institution_name=device.institution_name,
            institutional_department_name=device.institutional_department_name,
            coding_schemes=[private_coding_scheme()],
            series_description=series_description,
            previous_versions=list(previous_versions) or None,
        )
    _attach_content(sr, root)
    if device.station_name:
        sr.StationName = device.station_name
    logger.info(
        "built measurement report %s: %d series metrics, %d slice metrics, %d source images",
        sr.SOPInstanceUID,
        len(series_metrics),
        len(slice_metrics),
        len(sources),
    )
    return sr


def _root_without_children(root: ContainerContentItem) -> ContainerContentItem:
    """The root container of ``root`` without its Content Sequence, for the SR constructor.

    highdicom's SR constructor deep-copies the whole content tree it is given (and converts the
    copy back into content items, and walks it for image references): for the per-slice
    measurements of a long series that is most of the time spent on an SR. The tree built here is
    already made of highdicom content items and references only ``sources``, so the constructor
    gets the root alone and ``_attach_content`` puts the children in afterwards, the same objects
    highdicom would have written.
    """
    bare = ContainerContentItem(name=root.name, template_id=None)
    for kw in ("ContinuityOfContent", "ContentTemplateSequence"):
        if kw in root:
            bare[kw] = root[kw]
    bare.ContentSequence = []  # highdicom looks for one
    return bare


def _attach_content(sr: Comprehensive3DSR, root: ContainerContentItem) -> None:
    sr["ContentSequence"] = root["ContentSequence"]
    # what sr.content answers (highdicom keeps the tree it built beside the dataset)
    sr._content = ContentSequence([root], is_root=True)


def _text(value: str) -> str:
    """A TEXT item value (UT): one line, at most 1024 characters here."""
    return " ".join(value.split())[:1024]


def _output_name(kind: str) -> str:
    if kind.startswith("pmap:"):
        return f"Parametric Map {kind[5:]}"
    return {"sr": "Measurement report", "pdf": "Readable report (PDF)"}.get(kind, kind)


def read_notes(dataset: Dataset) -> dict[str, str]:
    """The TEXT items of the Qualitative Evaluations container written by
    ``build_measurement_report``: metric key (or "output", or "series" for the source series'
    notes) -> text, several joined by " | "."""
    reverse = {(m.concept.scheme_designator, m.concept.value): key for key, m in CATALOGUE.items()}
    out: dict[str, str] = {}
    for item in dataset.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) != (QUALITATIVE_EVALUATIONS.scheme_designator,
                                                             QUALITATIVE_EVALUATIONS.value):
            continue
        for child in item.get("ContentSequence", []):
            if child.ValueType != "TEXT":
                continue
            c = child.ConceptNameCodeSequence[0]
            key = {OUTPUT_NOT_PRODUCED.value: "output", SERIES_NOTE.value: "series"}.get(c.CodeValue) or reverse.get(
                (c.CodingSchemeDesignator, c.CodeValue), c.CodeMeaning)
            out[key] = f"{out[key]} | {child.TextValue}" if key in out else str(child.TextValue)
    return out


@dataclass(frozen=True)
class ReportContent:
    """What ``read_measurement_report`` found: the series and per-slice measurements, as put in."""

    series_metrics: tuple[MetricValue, ...]
    slice_metrics: tuple[SliceMetricValue, ...]


_ALGO_NAME, _ALGO_VERSION, _ALGO_PARAMS = "111001", "111003", "111002"


def _algorithm_of(item: Dataset) -> AlgorithmId | None:
    """TID 4019 items directly below a content item (NUM or group CONTAINER) -> AlgorithmId, or None."""
    found: dict[str, list[str]] = {}
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0]
        if name.CodingSchemeDesignator == "DCM" and name.CodeValue in (_ALGO_NAME, _ALGO_VERSION, _ALGO_PARAMS):
            found.setdefault(name.CodeValue, []).append(str(child.TextValue))
    if _ALGO_NAME not in found or _ALGO_VERSION not in found:
        return None
    sha = None
    notes = []
    for p in found.get(_ALGO_PARAMS, []):
        if p.startswith("weights_sha256="):
            sha = p.split("=", 1)[1]
        else:
            notes.append(p)
    return AlgorithmId(found[_ALGO_NAME][0], found[_ALGO_VERSION][0], sha, tuple(notes))


def read_measurement_report(dataset: Dataset) -> ReportContent:
    """Parse an SR written by ``build_measurement_report`` back into MetricValue/SliceMetricValue.

    Measurements without an image reference are series metrics (with the group's qualitative
    evaluation, if any); those with one are per-slice metrics. Concepts are mapped back to metric
    keys through the catalogue; an unknown concept is a ValueError.
    """
    sr = Comprehensive3DSR.from_dataset(dataset, copy=True)
    reverse = {(m.concept.scheme_designator, m.concept.value): key for key, m in CATALOGUE.items()}
    eval_values = {
        (c.scheme_designator, c.value): ev
        for c, ev in ((evaluation_code(True), Evaluation.WITHIN), (evaluation_code(False), Evaluation.OUTSIDE))
    }
    series: list[MetricValue] = []
    slices: list[SliceMetricValue] = []
    for group in sr.content.get_image_measurement_groups():
        group_algo = _algorithm_of(group[0])
        evals: dict[str, Evaluation] = {}
        for q in group.get_qualitative_evaluations():
            k = reverse.get((q.name.scheme_designator, q.name.value))
            v = eval_values.get((q.value.scheme_designator, q.value.value))
            if k is None or v is None:
                raise ValueError(f"Unknown qualitative evaluation {q.name.meaning!r} = {q.value.meaning!r}")
            evals[k] = v
        for m in group.get_measurements():
            key = reverse.get((m.name.scheme_designator, m.name.value))
            if key is None:
                raise ValueError(
                    f"Unknown measurement concept ({m.name.scheme_designator}, {m.name.value}, {m.name.meaning})"
                )
            algo = _algorithm_of(m[0]) or group_algo
            if algo is None:
                raise ValueError(
                    f"Measurement {m.name.meaning!r} has no TID 4019 algorithm identification, nor has its group"
                )
            refs = m.referenced_images
            if not refs:
                series.append(MetricValue(key, float(m.value), algo, evals.get(key), _limits_of(m[0])))
                continue
            for ref in refs:
                frames = ref.referenced_frame_numbers or [None]
                for fr in frames:
                    slices.append(
                        SliceMetricValue(
                            key,
                            float(m.value),
                            str(ref.referenced_sop_class_uid),
                            str(ref.referenced_sop_instance_uid),
                            algo,
                            int(fr) if fr is not None else None,
                        )
                    )
    return ReportContent(tuple(series), tuple(slices))


__all__ = [
    "build_measurement_report",
    "read_measurement_report",
    "read_notes",
    "ReportContent",
    "algorithm_identification",
]
