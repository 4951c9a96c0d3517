"""Helpers shared by the output builders: source checks, UIDs, file meta."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

from pydicom import Dataset
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)


def new_uid() -> str:
    """A fresh UID (pydicom's root, random suffix)."""
    return str(generate_uid())


def stable_uid(*parts: str) -> str:
    """A UID derived deterministically from ``parts`` (e.g. the device observer UID of our node)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def unique_sources(source_images: Sequence[Dataset]) -> list[Dataset]:
    """Source headers with repeated SOP instances removed, order kept.

    A ``CTVolume`` of a multi-frame image repeats the one header once per frame; the builders want
    each instance once.
    """
    if len(source_images) == 0:
        raise ValueError('Argument "source_images" must hold at least one source image header, got none')
    seen: set[str] = set()
    out: list[Dataset] = []
    for i, ds in enumerate(source_images):
        for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if kw not in ds:
                raise ValueError(f'Argument "source_images[{i}]" has no {kw}: it is not a usable image header')
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(ds)
    study_uids = {str(ds.StudyInstanceUID) for ds in out}
    if len(study_uids) != 1:
        raise ValueError(
            f'Argument "source_images" must all belong to one study, got {len(study_uids)} StudyInstanceUIDs'
        )
    return out


def n_frames(ds: Dataset) -> int:
    """Number of frames of an image header (1 for a single-frame image)."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"NumberOfFrames of source image is not an integer: {ds.get('NumberOfFrames')!r}") from exc


def is_multiframe(ds: Dataset) -> bool:
    return "NumberOfFrames" in ds or "PerFrameFunctionalGroupsSequence" in ds


@contextlib.contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's "unlikely to represent the intended person name" warning.

    It quotes the patient's name, and patient names must never reach logs. The name is copied
    from the source unchanged on purpose (PACS match on it), so the warning has nothing to fix.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name")
        yield



def derived_uids(source_series_instance_uid: str, kind: str, generation: int = 1) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) for output ``kind`` ("sr", "pm:<name>", "pdf") of a
    source series, the same every time for the same inputs.

    Rebuilding the outputs of the same analysis (e.g. after a crash between analysis and writing
    the outbox) then gives the same UIDs, so PACS sees a resend rather than a second object. Bump
    ``generation`` when the series is re-analysed with new content (a late instance re-opened it).
    """
    if not source_series_instance_uid or not kind:
        raise ValueError(
            f'Arguments "source_series_instance_uid" and "kind" must be non-empty, got '
            f"{source_series_instance_uid!r}, {kind!r}"
        )
    if not isinstance(generation, int) or generation < 1:
        raise ValueError(f'Argument "generation" must be a positive int, got {generation!r}')
    base = ("ctqa-node-output", source_series_instance_uid, kind, str(generation))
    return stable_uid(*base, "series"), stable_uid(*base, "instance")
