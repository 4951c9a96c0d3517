"""Structural check of a received dataset, streaming, before it is acknowledged.

One pass over the encoded dataset, element by element, in the negotiated transfer syntax (no pixel
decoding, no recursion, bounded memory):

* every element, item and sequence must end where its length says and inside its parent; undefined
  length sequences and items must be closed by their delimiters; the dataset must end on an element
  boundary (a dataset cut anywhere is refused);
* sequences may nest at most ``MAX_SEQUENCE_DEPTH`` deep and a dataset may hold at most
  ``MAX_ELEMENTS`` elements;
* Deflated Explicit VR Little Endian is inflated in chunks of at most ``CHUNK`` bytes while it is
  walked (``zlib.decompressobj`` with ``max_length``): the inflated size is counted and the walk stops
  as soon as it passes the instance cap, so a deflate bomb costs at most the cap in CPU, never in memory;
* the top-level Pixel Data must be complete: native, the length Rows x Columns x Samples x Bits
  Allocated x Frames implies (one trailing pad byte for odd lengths); encapsulated, an item sequence up
  to its delimiter with at least one fragment per frame, or a Basic (or Extended) Offset Table that
  points at fragment starts, one offset per frame.

A small set of top-level attributes (UIDs, image pixel description, scanner identity) is captured on the
way and decoded here, so that no other parser has to read the file again on the association thread.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom.datadict import DicomDictionary

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
NATIVE_SYNTAXES = (IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE)

MAX_SEQUENCE_DEPTH = 32  # real CT objects nest 2-6 deep; deeper is an attack on recursive readers
MAX_ELEMENTS = 1_000_000  # a 4,000-frame Enhanced CT has ~200,000 (elements, items and delimiters)
CHUNK = 1 << 20  # inflate at most this much at a time
_CAPTURE_MAX = 1024  # captured attribute values longer than this are treated as invalid
_OFFSET_TABLE_MAX = 8 << 20  # Basic/Extended Offset Table values read (1 million frames)

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
SPECIFIC_CHARACTER_SET = 0x00080005
EXTENDED_OFFSET_TABLE = 0x7FE00001
EXTENDED_OFFSET_LENGTHS = 0x7FE00002

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_VRS = _LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

# Top-level attributes captured while walking: tag -> keyword.
CAPTURED = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080021: "SeriesDate",
    0x00080022: "AcquisitionDate",
    0x00080030: "StudyTime",
    0x00080031: "SeriesTime",
    0x00080032: "AcquisitionTime",
    0x00080060: "Modality",
    0x00080070: "Manufacturer",
    0x00081010: "StationName",
    0x0008103E: "SeriesDescription",
    0x00081090: "ManufacturerModelName",
    0x00181000: "DeviceSerialNumber",
    0x00181030: "ProtocolName",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00201002: "ImagesInAcquisition",
    0x00280002: "SamplesPerPixel",
    0x00280004: "PhotometricInterpretation",
    0x00280006: "PlanarConfiguration",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280103: "PixelRepresentation",
}
_US = {"SamplesPerPixel", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated", "BitsStored",
       "PixelRepresentation"}
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK"}


def _limit(max_bytes: int) -> str:
    mib = max_bytes >> 20
    return f"{mib} MiB (node.max_instance_mb)" if mib and mib << 20 == max_bytes else f"{max_bytes} bytes"


class DatasetError(ValueError):
    """The dataset cannot be read to its end, or its pixel data is incomplete (C-STORE 0xC210)."""


class InstanceTooLarge(DatasetError):
    """The instance exceeds the node's limits: inflated size or number of elements (C-STORE 0xC212)."""


@dataclass
class PixelInfo:
    native_length: int | None = None  # defined-length (native) Pixel Data
    fragments: list[tuple[int, int]] = field(default_factory=list)  # (offset from first fragment item, length)
    offset_table: bytes | None = None  # the Basic Offset Table's value (the first item)
    first_fragment: int = 0  # dataset position of the first fragment's item tag
    complete: bool = False


@dataclass
class Structure:
    """What the walk found: the captured top-level attributes (raw bytes) and the Pixel Data layout."""

    transfer_syntax: str
    little_endian: bool
    raw: dict[str, tuple[bytes | None, bytes]]  # keyword -> (explicit VR or None, value bytes)
    pixel: PixelInfo | None
    extended_offset_table: bytes | None
    n_elements: int
    dataset_bytes: int  # inflated size for Deflated
    extended_offset_lengths: bytes | None = None  # (7FE0,0002), required beside the table

    # -- decoded attribute values ------------------------------------------------------------
    def text(self, keyword: str) -> str | None:
        item = self.raw.get(keyword)
        if item is None:
            return None
        value = item[1]
        if len(value) > _CAPTURE_MAX:
            return None
        charset = self.raw.get("SpecificCharacterSet")
        codec = "latin-1"
        if charset is not None and b"ISO_IR 192" in charset[1]:
            codec = "utf-8"
        text = value.decode(codec, errors="replace").rstrip("\x00 ").lstrip(" ")
        return text or None

    def uid(self, keyword: str) -> str | None:
        """The UID as sent (trailing NUL/space padding removed); None when absent or empty."""
        item = self.raw.get(keyword)
        if item is None:
            return None
        value = item[1][:_CAPTURE_MAX + 1].rstrip(b"\x00 ")
        return value.decode("latin-1") if value else None

    def integer(self, keyword: str) -> int | None:
        """US (binary) or IS (text) value; None when absent, empty, or not a number."""
        item = self.raw.get(keyword)
        if item is None or not item[1]:
            return None
        vr, value = item
        if keyword in _US:
            if vr not in (None, b"US", b"SS", b"UN") or len(value) != 2:
                return None
            return struct.unpack("<H" if self.little_endian else ">H", value)[0]
        try:
            return int(value.decode("ascii").split("\\")[0].strip(" \x00"))
        except (UnicodeDecodeError, ValueError):
            return None


# -- sources: a plain file region, or a raw deflate stream inflated on the fly ---------------------
class _FileSource:
    """A file region read through a window of at least ``WINDOW`` bytes (``os.pread``): the header
    elements before the Pixel Data are normally all in the first window, so that the walk makes one
    system call for them (a call releases the GIL, and pynetdicom's receive thread would take it
    each time); a value skipped is never read."""

    WINDOW = 1 << 16

    def __init__(self, f: BinaryIO, start: int, size: int, head: bytes = b"") -> None:
        self.fd = f.fileno()
        self.start = start
        self.size = size - start
        self.pos = 0
        self.buf = head[start:]  # what the caller read already, from ``start`` on
        self.buf_at = 0  # dataset position of buf[0]

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise DatasetError(f"dataset ends early: {n} bytes needed at offset {self.pos}, "
                               f"{self.size - self.pos} left")
        off = self.pos - self.buf_at
        if off < 0 or off + n > len(self.buf):
            self.buf = os.pread(self.fd, max(n, self.WINDOW), self.start + self.pos)
            self.buf_at, off = self.pos, 0
            if len(self.buf) < n:  # (the file shrank under us)
                raise DatasetError(f"dataset ends early: {n} bytes needed at offset {self.pos}")
        self.pos += n
        return self.buf[off:off + n]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise DatasetError(f"dataset ends early: a value of {n} bytes at offset {self.pos}, "
                               f"{self.size - self.pos} left")
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= self.size


class _InflateSource:
    def __init__(self, f: BinaryIO, start: int, cap: int) -> None:
        self.f = f
        self.cap = cap
        f.seek(start)
        self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buf = b""  # inflated, not yet consumed from self.off on
        self.off = 0
        self.pos = 0  # position in the inflated dataset
        self.inflated = 0

    def _inflate(self, want: int) -> bytes:
        """Up to ``want`` (<= CHUNK) more inflated bytes; b"" only at the end of the deflate stream."""
        while not self.z.eof:
            data = self.z.unconsumed_tail or self.f.read(1 << 16)
            if not data:
                raise DatasetError("deflated dataset is cut: the deflate stream does not end")
            try:
                out = self.z.decompress(data, want)
            except zlib.error as exc:
                raise DatasetError(f"deflated dataset is corrupt ({exc})") from None
            if out:
                self.inflated += len(out)
                if self.inflated > self.cap:
                    raise InstanceTooLarge(f"inflated dataset exceeds the instance limit of {_limit(self.cap)}")
                return out
        trailing = len(self.z.unused_data) + len(self.f.read(2))
        if trailing > 8:  # tolerated: DCMTK's pad byte, a stray zlib/gzip trailer (pydicom ignores them too)
            raise DatasetError("data follows the end of the deflate stream")
        return b""

    def _fill(self, n: int) -> None:
        """Make at least ``n`` unread bytes available in ``buf`` from ``off`` on."""
        parts = [self.buf[self.off:]]
        have = len(parts[0])
        while have < n:
            out = self._inflate(min(CHUNK, max(n - have, 1 << 16)))
            if not out:
                raise DatasetError(f"dataset ends early: {n} bytes needed at offset {self.pos}")
            parts.append(out)
            have += len(out)
        self.buf, self.off = b"".join(parts), 0

    def read(self, n: int) -> bytes:
        if len(self.buf) - self.off < n:
            self._fill(n)
        data = self.buf[self.off:self.off + n]
        self.off += n
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.cap:
            raise InstanceTooLarge(f"inflated dataset exceeds the instance limit of {_limit(self.cap)}")
        left = n
        take = min(left, len(self.buf) - self.off)
        self.off += take
        left -= take
        while left:
            out = self._inflate(min(CHUNK, left))
            if not out:
                raise DatasetError(f"dataset ends early: a value of {n} bytes at offset {self.pos}")
            left -= len(out)
        self.pos += n

    def at_end(self) -> bool:
        if self.off < len(self.buf):
            return False
        self.buf, self.off = self._inflate(1 << 16), 0
        return not self.buf


def _file_meta_end(head: bytes, f: BinaryIO, size: int) -> tuple[int, bytes]:
    """Offset of the dataset after the preamble, 'DICM' and the File Meta Information group, and
    the file's first bytes as read (``head``, read further when the group is longer)."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise DatasetError("no DICOM file preamble")
    pos = 132
    while True:
        if pos + 12 > len(head) and len(head) < size:
            head = head + os.pread(f.fileno(), max(1 << 16, pos + 12 - len(head)), len(head))
        hdr = head[pos:pos + 8]
        if len(hdr) < 8:
            raise DatasetError("file meta information is cut")
        group, _, vr = struct.unpack("<HH2s", hdr[:6])
        if group != 2:
            return pos, head
        if vr in _LONG_VRS:
            more = head[pos + 8:pos + 12]
            if len(more) < 4:
                raise DatasetError("file meta information is cut")
            pos += 12 + struct.unpack("<I", more)[0]
        else:
            pos += 8 + struct.unpack("<H", hdr[6:8])[0]
        if pos > size:
            raise DatasetError("file meta information is cut")


# Frame kinds on the walk stack
_DATASET, _SEQUENCE, _ITEMF, _PIXEL = range(4)


def walk_file(path: Path, transfer_syntax: str, *, max_bytes: int) -> Structure:
    """Walk the dataset of a DICOM file (preamble + file meta + dataset as pynetdicom spools it)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = os.pread(f.fileno(), _FileSource.WINDOW, 0)
        start, head = _file_meta_end(head, f, size)
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
            f.seek(start)
            src: _FileSource | _InflateSource = _InflateSource(io.BufferedReader(f, 1 << 16), start, max_bytes)
        else:
            if size - start > max_bytes:
                raise InstanceTooLarge(f"dataset of {size - start} bytes exceeds the instance limit of "
                                       f"{_limit(max_bytes)}")
            src = _FileSource(f, start, size, head)
        return _walk(src, transfer_syntax, max_bytes)


def _walk(src, ts: str, max_bytes: int) -> Structure:
    implicit0 = ts == IMPLICIT_VR_LE
    little0 = ts != EXPLICIT_VR_BE
    encapsulated_ts = ts not in NATIVE_SYNTAXES
    raw: dict[str, tuple[bytes | None, bytes]] = {}
    pixel: PixelInfo | None = None
    eot: bytes | None = None
    eot_lengths: bytes | None = None
    n_elements = 0
    # stack entries: [kind, end (absolute position or None), implicit, little, pixel info or None]
    stack: list[list] = [[_DATASET, None, implicit0, little0, None]]
    depth = 0  # sequences open
    read, skip = src.read, src.skip
    unpack = struct.unpack

    while True:
        kind, end, implicit, little, pinfo = stack[-1]
        if end is not None and src.pos >= end:
            if src.pos > end:
                raise DatasetError(f"an element runs past the end of its item or sequence (offset {src.pos})")
            stack.pop()
            if kind == _SEQUENCE:
                depth -= 1
            continue
        if kind == _DATASET and src.at_end():
            break
        hdr = read(8)
        tag_bytes = unpack("<HHI" if little else ">HHI", hdr)
        tag = tag_bytes[0] << 16 | tag_bytes[1]
        length = tag_bytes[2]
        if end is not None and src.pos > end:
            raise DatasetError(f"an element runs past the end of its item or sequence (offset {src.pos})")

        if kind in (_SEQUENCE, _PIXEL):
            if tag == _SEQ_END:
                if end is not None:
                    raise DatasetError("sequence delimiter in a sequence of defined length")
                stack.pop()
                if kind == _SEQUENCE:
                    depth -= 1
                else:
                    pinfo.complete = True
                continue
            if tag != _ITEM:
                raise DatasetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item must be")
            if kind == _PIXEL:
                if length == _UNDEFINED:
                    raise DatasetError("a Pixel Data fragment of undefined length")
                if pinfo.offset_table is None:  # the first item is the Basic Offset Table
                    if length > _OFFSET_TABLE_MAX or length % 4:
                        raise DatasetError(f"Basic Offset Table of {length} bytes")
                    pinfo.offset_table = read(length)
                    pinfo.first_fragment = src.pos
                else:
                    pinfo.fragments.append((src.pos - 8 - pinfo.first_fragment, length))
                    _check_fits(src, end, length, max_bytes)
                    skip(length)
                continue
            if length == _UNDEFINED:
                stack.append([_ITEMF, None, implicit, little, None])
            else:
                _check_fits(src, end, length, max_bytes)
                stack.append([_ITEMF, src.pos + length, implicit, little, None])
            continue

        # an element of a dataset or item
        if tag == _ITEM_END:
            if kind != _ITEMF or end is not None:
                raise DatasetError("item delimiter outside an item of undefined length")
            stack.pop()
            continue
        if tag >> 16 == 0xFFFE:
            raise DatasetError(f"misplaced item tag ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        n_elements += 1
        if n_elements > MAX_ELEMENTS:
            raise InstanceTooLarge(f"more than {MAX_ELEMENTS} elements")
        if implicit:
            vr = None
            is_seq = tag in _SQ_TAGS or (length == _UNDEFINED and tag != PIXEL_DATA)
        else:
            vr = hdr[4:6]
            if vr not in _VRS:
                raise DatasetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has an invalid VR {vr!r}")
            if vr in _LONG_VRS:
                length = unpack("<I" if little else ">I", read(4))[0]
                if end is not None and src.pos > end:
                    raise DatasetError(f"an element runs past the end of its item or sequence (offset {src.pos})")
            else:
                length = unpack("<H" if little else ">H", hdr[6:8])[0]
            is_seq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)

        if is_seq:
            depth += 1
            if depth > MAX_SEQUENCE_DEPTH:
                raise DatasetError(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
            # an undefined-length UN holds its items in Implicit VR Little Endian (PS3.5 6.2.2)
            as_implicit, as_little = (True, True) if vr == b"UN" else (implicit, little)
            if length == _UNDEFINED:
                stack.append([_SEQUENCE, None, as_implicit, as_little, None])
            else:
                _check_fits(src, end, length, max_bytes)
                stack.append([_SEQUENCE, src.pos + length, as_implicit, as_little, None])
            continue
        if tag == PIXEL_DATA and length == _UNDEFINED:
            if kind == _DATASET and not encapsulated_ts:
                raise DatasetError(f"encapsulated Pixel Data in the native transfer syntax {ts}")
            info = PixelInfo()
            if kind == _DATASET:
                pixel = info
            stack.append([_PIXEL, None, implicit, little, info])
            continue
        if length == _UNDEFINED:
            raise DatasetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length but is no sequence")
        _check_fits(src, end, length, max_bytes)
        if tag == SPECIFIC_CHARACTER_SET:  # at any depth: readers switch codecs on it mid-dataset
            if length > _CAPTURE_MAX:
                raise DatasetError(f"SpecificCharacterSet of {length} bytes")
            value = read(length)
            if any(c < 0x20 for c in value):
                raise DatasetError("SpecificCharacterSet holds control characters (a reader cannot look up its codec)")
            if kind == _DATASET:
                raw["SpecificCharacterSet"] = (vr, value)
            continue
        if kind == _DATASET:
            keyword = CAPTURED.get(tag)
            if keyword is not None:
                if length <= _CAPTURE_MAX:
                    raw[keyword] = (vr, read(length))
                else:  # kept too long to be valid, never whole
                    raw[keyword] = (vr, read(_CAPTURE_MAX + 1))
                    skip(length - _CAPTURE_MAX - 1)
                continue
            if tag == PIXEL_DATA:
                if encapsulated_ts:
                    raise DatasetError(f"native Pixel Data in the encapsulated transfer syntax {ts}")
                pixel = PixelInfo(native_length=length, complete=True)
            elif tag in (EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_LENGTHS):
                if length > _OFFSET_TABLE_MAX:
                    raise DatasetError(f"an Extended Offset Table of {length} bytes (more than "
                                       f"{_OFFSET_TABLE_MAX // 8} frames)")
                if tag == EXTENDED_OFFSET_TABLE:
                    eot = read(length)
                else:
                    eot_lengths = read(length)
                continue
        skip(length)

    if len(stack) > 1:
        raise DatasetError("dataset ends inside a sequence or item")
    return Structure(ts, little0, raw, pixel, eot, n_elements, src.pos, eot_lengths)


def _check_fits(src, end: int | None, length: int, max_bytes: int) -> None:
    if end is not None and src.pos + length > end:
        raise DatasetError(f"a value of {length} bytes runs past the end of its item or sequence")
    if src.pos + length > max_bytes:
        raise InstanceTooLarge(f"a value of {length} bytes exceeds the instance limit of {_limit(max_bytes)}")


def check_pixel_data(s: Structure) -> None:
    """Raise DatasetError unless the top-level Pixel Data is complete for the image it describes."""
    if s.pixel is None:
        raise DatasetError("no Pixel Data (the dataset may have been cut before it)")
    values = {}
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"):
        v = s.integer(kw)
        if v is None:
            raise DatasetError(f"{kw} missing or invalid: the Pixel Data cannot be described")
        values[kw] = v
    rows, cols, ba, bs = values["Rows"], values["Columns"], values["BitsAllocated"], values["BitsStored"]
    spp = values["SamplesPerPixel"]
    if rows < 1 or cols < 1:
        raise DatasetError(f"Rows x Columns {rows} x {cols}")
    if not 1 <= ba <= 64 or (ba != 1 and ba % 8):
        raise DatasetError(f"BitsAllocated {ba} (must be 1 or a multiple of 8 up to 64)")
    if not 1 <= bs <= ba:
        raise DatasetError(f"BitsStored {bs} with BitsAllocated {ba}")
    if values["PixelRepresentation"] not in (0, 1):
        raise DatasetError(f"PixelRepresentation {values['PixelRepresentation']}")
    if spp not in (1, 3):
        raise DatasetError(f"SamplesPerPixel {spp}")
    if spp == 3 and s.integer("PlanarConfiguration") not in (0, 1):
        raise DatasetError("PlanarConfiguration missing or invalid for colour pixels")
    photometric = s.text("PhotometricInterpretation")
    if photometric not in _PHOTOMETRIC:
        raise DatasetError(f"PhotometricInterpretation {photometric!r}")
    frames = 1
    if "NumberOfFrames" in s.raw and s.raw["NumberOfFrames"][1].strip(b" \x00"):  # empty: one frame
        frames = s.integer("NumberOfFrames")
        if frames is None or frames < 1:
            raise DatasetError("NumberOfFrames invalid")
    p = s.pixel
    if s.extended_offset_table is not None:
        # PS3.5 A.4: the table indexes encapsulated frames and comes with its lengths (7FE0,0002);
        # readers fail on one without the other (pydicom raises AttributeError decoding it)
        if p.native_length is not None:
            raise DatasetError("an Extended Offset Table beside native Pixel Data (it indexes encapsulated frames only)")
        if s.extended_offset_lengths is None or len(s.extended_offset_lengths) != len(s.extended_offset_table):
            raise DatasetError("an Extended Offset Table without Extended Offset Table Lengths of the same size")
    if p.native_length is not None:
        bits = rows * cols * spp * ba * frames
        expected = bits // 8 + (bits % 8 > 0)
        if photometric == "YBR_FULL_422":
            expected = expected // 3 * 2
        if p.native_length not in (expected, expected + expected % 2):
            raise DatasetError(f"Pixel Data of {p.native_length} bytes where the image needs {expected}")
        return
    if not p.complete:
        raise DatasetError("encapsulated Pixel Data is not closed by its sequence delimiter")
    if not p.fragments:
        raise DatasetError("encapsulated Pixel Data without any fragment")
    if frames == 1 or len(p.fragments) == frames:
        return
    starts = {offset for offset, _ in p.fragments}
    if p.offset_table:
        fmt = ("<" if s.little_endian else ">") + f"{len(p.offset_table) // 4}I"
        offsets = list(struct.unpack(fmt, p.offset_table))
        kind = "Basic Offset Table"
    elif s.extended_offset_table:
        fmt = ("<" if s.little_endian else ">") + f"{len(s.extended_offset_table) // 8}Q"
        offsets = list(struct.unpack(fmt, s.extended_offset_table[: len(s.extended_offset_table) // 8 * 8]))
        kind = "Extended Offset Table"
    else:
        if len(p.fragments) < frames:
            raise DatasetError(f"{len(p.fragments)} Pixel Data fragments for {frames} frames and no offset table")
        return
    if len(offsets) != frames or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) \
            or not set(offsets) <= starts:
        raise DatasetError(f"{kind} does not give one fragment start per frame for {frames} frames")
