"""Crafted (bad, hostile or unusual) datasets for the C-STORE validation tests, the fuzzers and
bench/deflate_bomb.py: spooled files as pynetdicom writes them, deflate bombs, deep nesting."""

from __future__ import annotations

import copy
import struct
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.dataset import FileMetaDataset

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def file_meta(sop_class: str, sop_instance: str, ts: str) -> bytes:
    """Preamble, 'DICM' and File Meta Information, as pynetdicom writes them before a received dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def write_instance(path: Path, dataset: bytes, ts: str, sop_class: str, sop_instance: str) -> Path:
    """A DICOM file made of the given encoded dataset bytes (sent as they are by a chunked SCU)."""
    Path(path).write_bytes(file_meta(sop_class, sop_instance, ts) + dataset)
    return Path(path)


def encode(ds: pydicom.Dataset, ts: str) -> bytes:
    """The dataset encoded in ``ts`` (without file meta). Deflated: raw deflate of Explicit VR LE."""
    buf = BytesIO()
    clean = pydicom.Dataset()  # without file_meta: dcmwrite writes the bare dataset
    for elem in ds:
        clean.add(copy.copy(elem))
    if ts == BIG_ENDIAN and "PixelData" in ds and ds.get("BitsAllocated") == 16:
        # pydicom writes the Pixel Data bytes as they are: swap the 16-bit words for big endian
        clean.PixelData = _swap16(ds.PixelData)
    dcmwrite(buf, clean, implicit_vr=ts == IMPLICIT, little_endian=ts != BIG_ENDIAN,
             enforce_file_format=False)
    raw = buf.getvalue()
    return deflate(raw) if ts == DEFLATED else raw


def _swap16(data: bytes) -> bytes:
    swapped = bytearray(len(data))
    swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
    return bytes(swapped)


def deflate(raw: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(raw) + c.flush()


def pixel_data_offset(dataset: bytes, little: bool = True) -> int:
    """Offset of the top-level Pixel Data element header in an encoded (not deflated) dataset."""
    tag = struct.pack("<HH" if little else ">HH", 0x7FE0, 0x0010)
    i = dataset.rfind(tag)
    assert i > 0, "no Pixel Data"
    return i


def explicit_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def nested_sequences(depth: int, tag: tuple[int, int] = (0x0040, 0xA730)) -> bytes:
    """``depth`` sequences nested inside one another (Explicit VR LE, undefined lengths)."""
    opening = struct.pack("<HH2s2xI", tag[0], tag[1], b"SQ", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def deflate_bomb(header: bytes, inflated_bytes: int, element_bytes: int = 1 << 20) -> bytes:
    """A raw deflate stream that inflates to ``header`` followed by about ``inflated_bytes`` of private
    OB elements of ``element_bytes`` zeros each (each element alone is small; together they are huge).

    Built from one compressed element repeated after full flushes, so that a 3 GiB bomb takes a
    fraction of a second to make and about 3 MiB to hold."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    creator = explicit_element(0x0009, 0x0010, b"LO", b"CTQA BOMB ")
    head = c.compress(header + creator) + c.flush(zlib.Z_FULL_FLUSH)
    element = explicit_element(0x0009, 0x1010, b"OB", b"\x00" * element_bytes)
    block = c.compress(element) + c.flush(zlib.Z_FULL_FLUSH)
    n = max(1, inflated_bytes // len(element))
    return head + block * n + c.flush()


def header_of(path: Path, ts: str = EXPLICIT) -> tuple[pydicom.Dataset, bytes]:
    """A real slice's dataset without its Pixel Data, and its encoding in ``ts`` (not deflated)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw = encode(ds, EXPLICIT if ts == DEFLATED else ts)
    return ds, raw
