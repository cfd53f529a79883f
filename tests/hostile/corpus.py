"""The hostile corpus: broken, oversized and misleading C-STOREs, generated from one good
chest radiograph by editing its encoded bytes, and the files fuzzing found (``crashes/``).

Each :class:`Case` is what a peer puts on the wire: the dataset bytes, the transfer syntax
of the presentation context, and the SOP Class and Instance UIDs of the C-STORE request. The
test harness wraps them in a Part-10 file the way pynetdicom's chunked receive does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import dicomgen
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
OK, A900, C000, NOT_SUPPORTED = 0x0000, 0xA900, 0xC000, 0x0122
REFUSED = frozenset({A900, C000})
ANY = frozenset({OK, A900, C000})
CRASHES = Path(__file__).parent / "crashes"

#: Patient data in every generated case: none of it may reach a log line.
PATIENT_NAME = "HOSTILE^PATIENT"
PATIENT_ID = "PID-HOSTILE-4711"


@dataclass(frozen=True)
class Case:
    name: str
    dataset: bytes
    transfer_syntax: str = ExplicitVRLittleEndian
    sop_class: str = CR
    sop_instance: str = ""
    expect: frozenset[int] = REFUSED
    skip_reason: str | None = None  # a substring of the recorded skip, when stored
    tags: tuple[str, ...] = field(default=())
    whole_file: bytes | None = None  # a fuzzing find: the Part-10 bytes as they were

    def part10(self) -> bytes:
        """The file pynetdicom's chunked receive writes: preamble, File Meta from the
        request, then the dataset bytes as they came."""
        if self.whole_file is not None:
            return self.whole_file
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = self.sop_instance
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        buffer = BytesIO()
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=True)
        return buffer.getvalue() + self.dataset


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


#: The SOP Instance UID of the fuzzing seed (its finds are replayed under it).
SEED_UID = "1.2.826.0.1.3680043.8.498.4711"


def good_dataset(**kwargs: object) -> Dataset:
    kwargs.setdefault("modality", "CR")
    ds = dicomgen.build_chest(
        patient_id=PATIENT_ID, study_uid=generate_uid(), rows=256, cols=256, **kwargs
    )
    ds.PatientName = PATIENT_NAME
    del ds.file_meta
    return ds


def case_of(name: str, ds: Dataset, **kwargs: object) -> Case:
    kwargs.setdefault("sop_instance", str(ds.SOPInstanceUID))
    kwargs.setdefault("sop_class", str(ds.SOPClassUID))
    syntax = str(kwargs.get("transfer_syntax", ExplicitVRLittleEndian))
    return Case(name, encode(ds, syntax), **kwargs)  # type: ignore[arg-type]


def element_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(start, value start, value length) of each top-level element of explicit VR little
    endian bytes with defined lengths (our generated datasets)."""
    offsets, position = [], 0
    while position + 8 <= len(data):
        vr = data[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (length,) = struct.unpack("<I", data[position + 8 : position + 12])
            value = position + 12
        else:
            (length,) = struct.unpack("<H", data[position + 6 : position + 8])
            value = position + 8
        offsets.append((position, value, length))
        position = value + length
    return offsets


def _element(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    long = vr in (b"OB", b"OW", b"SQ", b"UN", b"UT")
    size = len(value) if length is None else length
    if long:
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", size) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", size) + value


def _before_pixels(data: bytes, insert: bytes) -> bytes:
    """``insert`` placed where private group 0009 belongs (after group 0008)."""
    for start, _, _ in element_offsets(data):
        (group,) = struct.unpack("<H", data[start : start + 2])
        if group > 0x0009:
            return data[:start] + insert + data[start:]
    return data + insert


def _private_creator() -> bytes:
    return _element(0x0009, 0x0010, b"LO", b"HOSTILE ")


def truncations(base: Dataset) -> Iterator[Case]:
    """The good dataset cut at every structural boundary: before each element, inside its
    header, and in the middle of its value."""
    data = encode(base)
    for index, (start, value, length) in enumerate(element_offsets(data)):
        for label, cut in (
            ("element", start),
            ("header", start + 3),
            ("value", value + length // 2),
        ):
            if 0 < cut < len(data):
                yield Case(
                    f"truncated-{index:03}-{label}",
                    data[:cut],
                    sop_instance=str(base.SOPInstanceUID),
                    tags=("truncation",),
                )


def structural(base_factory) -> Iterator[Case]:  # noqa: ANN001 - a callable of good datasets
    """Every other kind of hostile input, one case each."""
    ds = base_factory()
    data = encode(ds)
    uid = str(ds.SOPInstanceUID)
    offsets = element_offsets(data)

    # wrong lengths: an element claiming more, less, or an odd count of bytes
    middle = offsets[len(offsets) // 3]
    for label, delta in (("longer", 6), ("shorter", -2), ("huge", 0x7FFFFF00)):
        start, value, length = middle
        new_length = (length + delta) if label != "huge" else delta
        header = bytearray(data[start:value])
        if value - start == 12:
            header[8:12] = struct.pack("<I", new_length & 0xFFFFFFFF)
        else:
            header[6:8] = struct.pack("<H", new_length & 0xFFFF)
        yield Case(
            f"wrong-length-{label}",
            data[:start] + bytes(header) + data[value:],
            sop_instance=uid,
            expect=ANY,
        )

    # an undefined-length private sequence whose item never closes (everything after it,
    # the pixels included, belongs to the item)
    open_item = (
        _private_creator()
        + struct.pack("<HH", 0x0009, 0x1001)
        + b"SQ\0\0\xff\xff\xff\xff"
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + _element(0x0009, 0x1002, b"LO", b"OPEN")
    )
    yield Case("item-never-closes", _before_pixels(data, open_item), sop_instance=uid)

    # 2,000 nested sequences
    depth = 2000
    nested = b""
    for _ in range(depth):
        nested += struct.pack("<HH", 0x0009, 0x1001) + b"SQ\0\0\xff\xff\xff\xff"
        nested += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    for _ in range(depth):
        nested += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # item delimiter
        nested += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)  # sequence delimiter
    yield Case(
        "sequences-2000-deep",
        _before_pixels(data, _private_creator() + nested),
        sop_instance=uid,
        expect=ANY,
    )

    # a flood of tiny elements in a private sequence item: refused, not parsed to the end
    flood = b"".join(_element(0x0009, 0x1100 + (i % 0xFF), b"LO", b"") for i in range(700_000))
    flooded = (
        _private_creator()
        + struct.pack("<HH", 0x0009, 0x1001)
        + b"SQ\0\0\xff\xff\xff\xff"
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + flood
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    yield Case(
        "element-flood", _before_pixels(data, flooded), sop_instance=uid, expect=frozenset({C000})
    )

    # geometry that the pixels cannot back
    big = base_factory()
    big.Rows = big.Columns = 65535
    yield case_of("rows-columns-beyond-data", big, expect=frozenset({C000}))

    short = base_factory()
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    yield case_of("pixel-data-short", short, expect=frozenset({C000}))

    long = base_factory()
    long.PixelData = long.PixelData + b"\0" * 4096
    yield case_of("pixel-data-long", long, expect=frozenset({OK}))

    missing = base_factory()
    del missing.PixelData
    yield case_of("pixel-data-missing", missing, expect=frozenset({A900}))

    # bad UIDs in the dataset (the request's UID stays valid, as pynetdicom would send it)
    for label, bad in (
        ("70-chars", "1." + "2" * 68),
        ("letters", "1.2.840.abc.1"),
        ("dot-dot-slash", "../../../../tmp/cxrnode-escape"),
        ("leading-zero", "1.2.03.4"),
        ("empty", ""),
    ):
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            bad_ds = base_factory()
            request_uid = str(bad_ds.SOPInstanceUID)
            setattr(bad_ds, keyword, bad)
            yield case_of(
                f"bad-uid-{label}-{keyword}",
                bad_ds,
                sop_instance=request_uid,
                expect=frozenset({A900, C000}),
                tags=("uid",),
            )

    # character sets: unknown, mismatched, and bytes no character set decodes
    for label, charset, raw_name in (
        ("unknown", "ISO_IR 999", b"M\xfcller^Hans"),
        ("iso2022-bad-escape", "ISO 2022 IR 87", b"\x1b$B\xff\xfe\x1b(B^X"),
        ("gb18030-garbage", "GB18030", b"\x81\x30\xff\x00\xfe^Y"),
        ("utf8-invalid", "ISO_IR 192", b"\xed\xa0\x80\xc3\x28^Z"),
        ("nul-bytes", "ISO_IR 100", b"A\x00B^C\x00"),
        ("multi-valued", "ISO_IR 100\\ISO_IR 999\\\\", b"SOMEONE"),
    ):
        cs_ds = base_factory()
        cs_ds.SpecificCharacterSet = charset
        encoded = encode(cs_ds)
        # replace the patient name value with the raw bytes (even length, as DICOM wants)
        raw = raw_name + (b" " if len(raw_name) % 2 else b"")
        for start, value, length in element_offsets(encoded):
            if encoded[start : start + 4] == struct.pack("<HH", 0x0010, 0x0010):
                encoded = (
                    encoded[:start]
                    + _element(0x0010, 0x0010, b"PN", raw)
                    + encoded[value + length :]
                )
                break
        yield Case(
            f"charset-{label}",
            encoded,
            sop_instance=str(cs_ds.SOPInstanceUID),
            expect=frozenset({OK, C000}),
            tags=("charset",),
        )

    # a transfer syntax that does not match the bytes
    mismatch = base_factory()
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit):
        yield Case(
            f"transfer-syntax-{syntax.name.replace(' ', '-').lower()}",
            encode(mismatch),
            transfer_syntax=syntax,
            sop_instance=str(mismatch.SOPInstanceUID),
            expect=ANY if syntax == ImplicitVRLittleEndian else REFUSED,
        )

    # a huge private element (defined length): skipped over, never read into memory
    huge = base_factory()
    blob = _private_creator() + _element(0x0009, 0x1010, b"OB", b"\xab" * (24 << 20))
    yield Case(
        "huge-private-element",
        _before_pixels(encode(huge), blob),
        sop_instance=str(huge.SOPInstanceUID),
        expect=frozenset({OK}),
    )

    # garbage after a valid start, and nothing at all
    yield Case("garbage", bytes(range(256)) * 64, sop_instance=generate_uid())
    yield Case("empty", b"", sop_instance=generate_uid())

    # header says one image, the request another
    other = base_factory()
    yield case_of(
        "request-uid-differs", other, sop_instance=generate_uid(), expect=frozenset({A900})
    )

    # not a chest radiograph: stored, skipped with the reason, answered success
    ct = base_factory()
    ct.Modality = "CT"
    yield case_of("ct-under-cr-class", ct, expect=frozenset({OK}), skip_reason="Modality CT")
    tiny = base_factory()
    tiny.Rows = tiny.Columns = 64
    tiny.PixelData = b"\0" * (64 * 64 * 2)
    yield case_of("too-small-for-a-chest", tiny, expect=frozenset({OK}), skip_reason="too small")
    strip = base_factory()
    strip.Rows, strip.Columns = 1024, 128
    strip.PixelData = b"\0" * (1024 * 128 * 2)
    yield case_of("strip", strip, expect=frozenset({OK}), skip_reason="elongated")

    # files fuzzing once found troublesome, kept as regression cases
    for path in sorted(CRASHES.glob("*.bin")):
        yield Case(
            f"crash-{path.stem}",
            b"",
            whole_file=path.read_bytes(),
            sop_instance=SEED_UID,
            expect=ANY | {NOT_SUPPORTED},
            tags=("crash",),
        )


def corpus() -> list[Case]:
    return [*truncations(good_dataset()), *structural(good_dataset)]
