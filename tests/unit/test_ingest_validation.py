"""What the C-STORE path acknowledges: only datasets that can be read to their end with complete Pixel
Data (scp.dataset_check via scp.ingest.read_instance_info), Deflated both ways with a bounded inflate,
deep nesting refused without recursion, and one log line per refusal."""

from __future__ import annotations

import logging
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from scp.dataset_check import MAX_SEQUENCE_DEPTH, DatasetError, InstanceTooLarge
from scp.ingest import Ingestor, StoreStatus, read_instance_info
from storage.db import Database
from storage.filestore import FileStore, InvalidUID, is_valid_uid
from tests.crafted import (
    BIG_ENDIAN, CT_IMAGE, DEFLATED, EXPLICIT, IMPLICIT, deflate, deflate_bomb, encode, file_meta, header_of,
    nested_sequences, pixel_data_offset, write_instance,
)
from tests.helpers import PHANTOM_5MM, SHARED_DATA, require

CORPUS = SHARED_DATA / "corpus"
MiB = 1 << 20


def slice_path() -> Path:
    return require(PHANTOM_5MM) / "I10"


def info_of(path: Path, ts: str | None = None, *, like: Path | None = None, **kw):
    """read_instance_info with the request's UIDs taken from ``like`` (default: the file itself)."""
    ds = pydicom.dcmread(like or path, stop_before_pixels=True)
    return read_instance_info(path, affected_sop_class=str(ds.SOPClassUID),
                              affected_sop_instance=str(ds.SOPInstanceUID),
                              transfer_syntax=ts or str(ds.file_meta.TransferSyntaxUID), **kw)


def as_instance(tmp_path: Path, ds: pydicom.Dataset, ts: str, name: str = "x.dcm") -> Path:
    return write_instance(tmp_path / name, encode(ds, ts), ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_every_real_ct_instance_in_the_shared_data_is_accepted_with_its_header():
    """Every CT / Enhanced CT / Legacy Converted file of the shared corpus (all transfer syntaxes,
    vendors, oddities) passes, with the same UIDs and frame count pydicom reads."""
    files = [p for p in require(CORPUS).rglob("*") if p.is_file() and p.name != "LICENSE" and not p.suffix == ".md"]
    checked = invalid = 0
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if str(ds.SOPClassUID) not in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                                       "1.2.840.10008.5.1.4.1.1.2.2"):
            continue
        if not all(is_valid_uid(str(ds.get(k, ""))) for k in ("SOPInstanceUID", "SeriesInstanceUID",
                                                                 "StudyInstanceUID")):
            with pytest.raises(InvalidUID):  # the corpus's files with UIDs the standard forbids
                info_of(p)
            invalid += 1
            continue
        info = info_of(p)
        assert (info.sop_instance_uid, info.series_instance_uid, info.study_instance_uid) == (
            ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID), p
        assert info.number_of_frames == int(ds.get("NumberOfFrames", 1) or 1), p
        assert info.manufacturer == (str(ds.Manufacturer).strip()[:64] or None if "Manufacturer" in ds else None), p
        checked += 1
    assert checked >= 40 and invalid >= 1
    # the multi-frame ones: 2 frames JPEG Extended in 2 fragments without offset table; 3 native frames
    frag = next((CORPUS / "dicomParser" / "Acme_EnhancedCT_JPEGext_frag").glob("*.dcm"))
    assert info_of(frag).number_of_frames == 2
    legacy = next((CORPUS / "dcmqi" / "GE_LegacyConvertedEnhanced_tiny").glob("*.dcm"))
    assert info_of(legacy).number_of_frames == 3


def test_cut_anywhere_is_refused_including_just_before_pixel_data(tmp_path):
    src = slice_path()
    raw = src.read_bytes()
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    body = raw[raw.index(b"DICM") + 4:]
    body = body[struct.unpack("<I", body[8:12])[0] + 12:]  # after the source's own file meta
    pix = pixel_data_offset(body)
    cuts = sorted({pix, pix + 4, pix + 12, pix + 13, len(body) - 2, len(body) - 1, 1, 7, 100, 600, pix - 1})
    for cut in cuts:
        f = write_instance(tmp_path / f"cut{cut}.dcm", body[:cut], EXPLICIT, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        with pytest.raises((DatasetError, KeyError)) as exc:
            info_of(f, EXPLICIT, like=src)
        if cut == pix:  # a clean element boundary: only the missing Pixel Data tells
            assert "no Pixel Data" in str(exc.value)
    # the complete body is fine
    whole = write_instance(tmp_path / "whole.dcm", body, EXPLICIT, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert info_of(whole).sop_instance_uid == ds.SOPInstanceUID


def test_native_pixel_data_length_must_match_the_image(tmp_path):
    ds = pydicom.dcmread(slice_path())
    ds.Rows = 511  # 511 x 512 x 2 bytes needed, 512 x 512 x 2 present
    with pytest.raises(DatasetError, match="524288 bytes where the image needs 523264"):
        info_of(as_instance(tmp_path, ds, EXPLICIT))
    # an odd-length 3 x 3 8-bit image with its one pad byte is complete
    small = pydicom.dcmread(slice_path())
    small.Rows, small.Columns, small.BitsAllocated, small.BitsStored, small.HighBit = 3, 3, 8, 8, 7
    small.PixelRepresentation = 0
    small.PixelData = bytes(range(9))
    f = as_instance(tmp_path, small, EXPLICIT, "small.dcm")
    assert info_of(f).sop_instance_uid == small.SOPInstanceUID
    np.testing.assert_array_equal(pydicom.dcmread(f, force=True).pixel_array.ravel(), np.arange(9))
    small.NumberOfFrames = 2  # 18 bytes needed
    with pytest.raises(DatasetError, match="10 bytes where the image needs 18"):
        info_of(as_instance(tmp_path, small, EXPLICIT, "small2.dcm"))
    for kw, bad in (("BitsAllocated", 12), ("SamplesPerPixel", 2), ("PixelRepresentation", 2)):
        d = pydicom.dcmread(slice_path())
        setattr(d, kw, bad)
        with pytest.raises(DatasetError, match=kw):
            info_of(as_instance(tmp_path, d, EXPLICIT, f"{kw}.dcm"))


def test_encapsulated_fragments_and_offset_tables(tmp_path):
    ds = pydicom.dcmread(slice_path())
    frames = [b"\xff\xd8" + bytes([i]) * 1000 + b"\xff\xd9" for i in range(3)]
    ds.NumberOfFrames = 3
    ts = "1.2.840.10008.1.2.4.70"

    def instance(pixel: bytes, name: str) -> Path:
        body = encode(ds, EXPLICIT)
        body = body[:pixel_data_offset(body)] + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + pixel
        return write_instance(tmp_path / name, body, ts, CT_IMAGE, str(ds.SOPInstanceUID))

    item = lambda value: struct.pack("<HHI", 0xFFFE, 0xE000, len(value)) + value  # noqa: E731
    end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    bot = struct.pack("<3I", 0, 1012, 2024)
    assert info_of(instance(item(b"") + b"".join(map(item, frames)) + end, "ok.dcm"), ts).number_of_frames == 3
    assert info_of(instance(item(bot) + b"".join(map(item, frames)) + end, "bot.dcm"), ts).number_of_frames == 3
    # two fragments for the first frame, one for each other: fine with a BOT pointing at frame starts
    split = [frames[0][:500], frames[0][500:], frames[1], frames[2]]
    bot2 = struct.pack("<3I", 0, 508 + 512, 508 + 512 + 1012)  # items: 8-byte header + value
    assert info_of(instance(item(bot2) + b"".join(map(item, split)) + end, "bot2.dcm"), ts).number_of_frames == 3
    with pytest.raises(DatasetError, match="Basic Offset Table does not give one fragment start per frame"):
        info_of(instance(item(bot) + b"".join(map(item, split)) + end, "badbot.dcm"), ts)
    # an Extended Offset Table (7FE0,0001) instead of the BOT, as for frames of more than 4 GiB in all
    eot = lambda offsets: struct.pack("<HH2s2xI", 0x7FE0, 0x0001, b"OV", 8 * len(offsets)) + struct.pack(  # noqa: E731
        f"<{len(offsets)}Q", *offsets)

    lengths = lambda values: struct.pack("<HH2s2xI", 0x7FE0, 0x0002, b"OV", 8 * len(values)) + struct.pack(  # noqa: E731
        f"<{len(values)}Q", *values)

    def with_eot(offsets, name, frame_lengths=(1004, 1004, 1004), pixel=None):
        body = encode(ds, EXPLICIT)
        at = pixel_data_offset(body)
        tables = eot(offsets) + (lengths(frame_lengths) if frame_lengths is not None else b"")
        pixel = pixel if pixel is not None else (struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
                                                 + item(b"") + b"".join(map(item, split)) + end)
        return write_instance(tmp_path / name, body[:at] + tables + pixel, ts, CT_IMAGE, str(ds.SOPInstanceUID))

    f = with_eot([0, 1020, 2032], "eot.dcm")
    assert info_of(f, ts).number_of_frames == 3
    read = pydicom.dcmread(f)
    assert struct.unpack("<3Q", read.ExtendedOffsetTableLengths) == (1004, 1004, 1004)
    with pytest.raises(DatasetError, match="Extended Offset Table does not give one fragment start per frame"):
        info_of(with_eot([0, 1012, 2024], "badeot.dcm"), ts)
    # the table needs its lengths, of its size (pydicom raises AttributeError decoding a table without them)
    with pytest.raises(DatasetError, match="without Extended Offset Table Lengths of the same size"):
        info_of(with_eot([0, 1020, 2032], "eot_nolengths.dcm", frame_lengths=None), ts)
    with pytest.raises(DatasetError, match="without Extended Offset Table Lengths of the same size"):
        info_of(with_eot([0, 1020, 2032], "eot_shortlengths.dcm", frame_lengths=(1004, 1004)), ts)
    # and it indexes encapsulated frames only: beside native Pixel Data it is refused (found by the fuzzer)
    native = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 3 * 512 * 512 * 2) + bytes(3 * 512 * 512 * 2)
    with pytest.raises(DatasetError, match="beside native Pixel Data"):
        info_of(with_eot([0, 524288, 1048576], "eot_native.dcm", pixel=native), EXPLICIT)
    with pytest.raises(DatasetError, match="2 Pixel Data fragments for 3 frames and no offset table"):
        info_of(instance(item(b"") + b"".join(map(item, frames[:2])) + end, "few.dcm"), ts)
    with pytest.raises(DatasetError, match="dataset ends early"):
        info_of(instance(item(b"") + b"".join(map(item, frames)), "nodelim.dcm"), ts)
    with pytest.raises(DatasetError, match="without any fragment"):
        info_of(instance(item(b"") + end, "empty.dcm"), ts)
    with pytest.raises(DatasetError, match="native Pixel Data in the encapsulated transfer syntax"):
        info_of(write_instance(tmp_path / "native.dcm", encode(pydicom.dcmread(slice_path()), EXPLICIT), ts,
                               CT_IMAGE, str(ds.SOPInstanceUID)), ts)
    # pydicom's own encapsulation (with its BOT) is accepted and reads back frame by frame
    ok = instance(encapsulate(frames, has_bot=True) + end, "enc.dcm")  # pydicom writes the delimiter itself
    assert info_of(ok, ts).number_of_frames == 3
    assert list(pydicom.encaps.generate_frames(pydicom.dcmread(ok).PixelData, number_of_frames=3)) == frames


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT, BIG_ENDIAN, DEFLATED])
def test_each_native_syntax_is_read_to_the_end(tmp_path, ts):
    ds = pydicom.dcmread(slice_path())
    f = as_instance(tmp_path, ds, ts)
    info = info_of(f, ts)
    assert info.sop_instance_uid == ds.SOPInstanceUID and info.manufacturer == "Philips"
    back = pydicom.dcmread(f)
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    # the same bytes cut by 100 are refused in every syntax (for Deflated: the compressed stream is cut)
    cut = write_instance(tmp_path / "cut.dcm", f.read_bytes()[len(file_meta(CT_IMAGE, str(ds.SOPInstanceUID), ts)):-100],
                         ts, CT_IMAGE, str(ds.SOPInstanceUID))
    with pytest.raises(DatasetError):
        info_of(cut, ts, like=f)


def test_deflated_corpus_file_accepted_as_received():
    f = next((require(CORPUS) / "cornerstone3D" / "GE_HiSpeedCTi_TS_DeflatedExplicitVRLittleEndian").glob("*.dcm"))
    info = info_of(f)
    assert info.transfer_syntax_uid == DEFLATED and info.manufacturer == "GE MEDICAL SYSTEMS"
    assert f.stat().st_size < 300_000  # compressed on disk: 512 x 512 x 2 inflated


def test_deflate_bomb_refused_with_bounded_memory(tmp_path):
    ds, header = header_of(slice_path())
    bomb = deflate_bomb(header, 256 * MiB)
    assert len(bomb) < 400_000
    f = write_instance(tmp_path / "bomb.dcm", bomb, DEFLATED, CT_IMAGE, str(ds.SOPInstanceUID))
    tracemalloc.start()
    try:
        with pytest.raises(InstanceTooLarge, match="exceeds the instance limit of 64 MiB"):
            info_of(f, DEFLATED, like=slice_path(), max_bytes=64 * MiB)  # (pydicom would inflate it all)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB allocated to refuse a bomb"
    # a Pixel Data length beyond the cap is refused at its header, before anything is inflated
    big = header + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 3 << 30)
    f2 = write_instance(tmp_path / "bomb2.dcm", deflate(big) , DEFLATED, CT_IMAGE, str(ds.SOPInstanceUID))
    with pytest.raises(InstanceTooLarge, match="a value of 3221225472 bytes exceeds"):
        info_of(f2, DEFLATED, like=slice_path(), max_bytes=2048 * MiB)
    # and a plain instance over the cap is refused by its size
    with pytest.raises(InstanceTooLarge, match="dataset of 531580 bytes exceeds the instance limit of 1000 bytes"):
        info_of(slice_path(), max_bytes=1000)


def test_sequences_nested_up_to_the_limit_accepted_deeper_refused(tmp_path):
    ds = pydicom.dcmread(slice_path())
    body = encode(ds, EXPLICIT)
    pix = pixel_data_offset(body)
    for depth, ok in ((MAX_SEQUENCE_DEPTH, True), (MAX_SEQUENCE_DEPTH + 1, False), (500, False)):
        f = write_instance(tmp_path / f"n{depth}.dcm", body[:pix] + nested_sequences(depth) + body[pix:],
                           EXPLICIT, CT_IMAGE, str(ds.SOPInstanceUID))
        if ok:
            assert info_of(f, EXPLICIT, like=slice_path()).sop_instance_uid == ds.SOPInstanceUID
            back = pydicom.dcmread(f)
            seq, n = back.ContentSequence, 1
            while "ContentSequence" in seq[0]:
                seq, n = seq[0].ContentSequence, n + 1
            assert n == depth
        else:
            with pytest.raises(DatasetError, match=f"nested deeper than {MAX_SEQUENCE_DEPTH}"):
                info_of(f, EXPLICIT, like=slice_path())


def test_structure_errors(tmp_path):
    ds = pydicom.dcmread(slice_path())
    body = encode(ds, EXPLICIT)
    pix = pixel_data_offset(body)
    sq = struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    cases = {
        "unclosed item": sq + item + body[pix:],  # the Pixel Data inside the item, never closed
        "invalid VR": struct.pack("<HH2sH", 0x0009, 0x1010, b"\x00\x01", 2) + b"ab" + body[pix:],
        "item of 100 bytes in a sequence of 10": struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", 10)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 100) + body[pix:],
        "undefined length on UT": struct.pack("<HH2s2xI", 0x0040, 0xA160, b"UT", 0xFFFFFFFF) + body[pix:],
    }
    messages = {
        "unclosed item": "dataset ends",
        "invalid VR": "invalid VR",
        "item of 100 bytes in a sequence of 10": "runs past the end of its item or sequence",
        "undefined length on UT": "undefined length but is no sequence",
    }
    for what, tail in cases.items():
        f = write_instance(tmp_path / "bad.dcm", body[:pix] + tail, EXPLICIT, CT_IMAGE, str(ds.SOPInstanceUID))
        with pytest.raises(DatasetError, match=messages[what]):
            info_of(f, EXPLICIT, like=slice_path())


def test_character_set_a_reader_cannot_use_is_refused_at_any_depth(tmp_path):
    """Found by the fuzzer: a NUL inside (0008,0005) makes pydicom's reader itself fail (codec lookup),
    top level or inside an item, so such a dataset must not be acknowledged."""
    ds = pydicom.dcmread(slice_path())
    body = encode(ds, EXPLICIT)
    pix = pixel_data_offset(body)
    charset = struct.pack("<HH2sH", 0x0008, 0x0005, b"CS", 10) + b"ISO_IR\x00100"
    item = charset + struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"T-1 "
    nested = (struct.pack("<HH2s2xI", 0x0040, 0xA730, b"SQ", 8 + len(item))
              + struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item)
    at = body.index(struct.pack("<HH", 0x0008, 0x0016))  # before SOP Class UID: the dataset stays ordered
    for name, data in (("top.dcm", body[:at] + charset + body[at:]), ("nested.dcm", body[:pix] + nested + body[pix:])):
        f = write_instance(tmp_path / name, data, EXPLICIT, CT_IMAGE, str(ds.SOPInstanceUID))
        with pytest.raises((ValueError, TypeError)):  # pydicom cannot read it ("embedded null character")
            back = pydicom.dcmread(f)
            back.get("ContentSequence") and back.ContentSequence[0].CodeValue  # (a defined-length SQ is read lazily)
        with pytest.raises(DatasetError, match="SpecificCharacterSet holds control characters"):
            info_of(f, EXPLICIT, like=slice_path())


@pytest.fixture
def ingestor(tmp_path):
    store = FileStore(tmp_path / "var")
    store.prepare()
    db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")
    db.create_all()
    return Ingestor(db, store, max_instance_bytes=64 * MiB), store


def push(ing: Ingestor, store: FileStore, f: Path, ts: str, sop_instance: str):
    spooled = store.spool / "in.dcm"
    spooled.write_bytes(f.read_bytes())
    return ing.store_file(spooled, affected_sop_class=CT_IMAGE, affected_sop_instance=sop_instance,
                          transfer_syntax=ts, scanner="CT1", calling_ae="CT1", peer_host="127.0.0.1")


def test_ingestor_statuses_one_log_line_nothing_kept(ingestor, tmp_path, caplog, monkeypatch):
    ing, store = ingestor
    ds, header = header_of(slice_path())
    uid = str(ds.SOPInstanceUID)
    cut = write_instance(tmp_path / "cut.dcm", header, EXPLICIT, CT_IMAGE, uid)
    bomb = write_instance(tmp_path / "bomb.dcm", deflate_bomb(header, 128 * MiB), DEFLATED, CT_IMAGE, uid)
    body = encode(pydicom.dcmread(slice_path()), EXPLICIT)
    pix = pixel_data_offset(body)
    deep = write_instance(tmp_path / "deep.dcm", body[:pix] + nested_sequences(500) + body[pix:], EXPLICIT,
                          CT_IMAGE, uid)
    caplog.set_level(logging.DEBUG, logger="scp")
    for f, ts, status, text in ((cut, EXPLICIT, 0xC210, "no Pixel Data"), (bomb, DEFLATED, 0xC212, "64 MiB"),
                                (deep, EXPLICIT, 0xC210, "nested deeper than 32")):
        caplog.clear()
        r = push(ing, store, f, ts, uid)
        assert r.status == status and text in r.detail
        (rec,) = [r for r in caplog.records if r.name.startswith("scp")]
        assert rec.levelno == logging.WARNING and rec.exc_info is None and text in rec.getMessage()
        assert "PatientName" not in rec.getMessage() and str(ds.PatientID) not in rec.getMessage()
    # an unexpected error in the node: 0xC211, one ERROR line, no traceback above DEBUG
    import scp.ingest

    monkeypatch.setattr(scp.ingest, "check_pixel_data", lambda s: 1 / 0)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="scp")
    r = push(ing, store, as_instance(tmp_path, pydicom.dcmread(slice_path()), EXPLICIT), EXPLICIT, uid)
    assert r.status == StoreStatus.PROCESSING_FAILURE == 0xC211
    (rec,) = caplog.records
    assert rec.levelno == logging.ERROR and rec.exc_info is None and "ZeroDivisionError" in rec.getMessage()
    monkeypatch.undo()
    assert [p for p in store.store.rglob("*") if p.is_file()] == []
    assert list(store.spool.iterdir()) == []
    # a valid deflated instance is stored byte for byte as received
    good = as_instance(tmp_path, pydicom.dcmread(slice_path()), DEFLATED, "good.dcm")
    r = push(ing, store, good, DEFLATED, uid)
    assert r.status == 0 and r.outcome == "stored"
    (kept,) = [p for p in store.store.rglob("*.dcm")]
    assert kept.read_bytes() == good.read_bytes()
    np.testing.assert_array_equal(pydicom.dcmread(kept).pixel_array, pydicom.dcmread(slice_path()).pixel_array)


def test_config_max_instance_mb():
    from node.config import ConfigError, settings_from_dict

    base = {"node": {"data_dir": "/tmp/x", "database": "sqlite:///x"}}
    assert settings_from_dict(base).node.max_instance_mb == 2048
    assert settings_from_dict({"node": {**base["node"], "max_instance_mb": 100}}).node.max_instance_mb == 100
    with pytest.raises(ConfigError, match="'node.max_instance_mb' must be >= 1 MiB, got 0"):
        settings_from_dict({"node": {**base["node"], "max_instance_mb": 0}})
