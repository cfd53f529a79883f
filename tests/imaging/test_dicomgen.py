"""The synthetic DICOM generator writes files that real readers accept."""

import subprocess
from pathlib import Path

import dicomgen
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

UNCOMPRESSED_VARIANTS = {
    "dx_mono2_window": {},
    "cr_mono1_window": {"modality": "CR", "photometric": "MONOCHROME1"},
    "dx_voi_lut": {"voi": "lut"},
    "dx_no_voi": {"voi": "none"},
    "cr_14bit_rescale": {"modality": "CR", "bits_stored": 14, "rescale": (0.5, -1000.0)},
    "dx_16bit": {"bits_stored": 16},
    "dx_signed": {"signed": True},
    "cr_inverse_shape": {"modality": "CR", "presentation_lut_shape": "INVERSE"},
    "dx_view_code": {"use_view_code": True, "view": "LL"},
    "dx_for_processing": {"for_processing": True},
    "cr_modality_lut": {"modality": "CR", "modality_lut": True},
}


def _dcmdump(path: Path) -> str:
    proc = subprocess.run(["/usr/bin/dcmdump", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED_VARIANTS))
def test_every_chest_variant_parses_with_pydicom_and_dcmdump(gen_dir: Path, name: str) -> None:
    path = dicomgen.make_chest(
        gen_dir / f"{name}.dcm", rows=64, cols=48, **UNCOMPRESSED_VARIANTS[name]
    )
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.shape == (64, 48)
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
    dump = _dcmdump(path)
    assert ds.SOPInstanceUID in dump
    assert ds.PhotometricInterpretation in dump


def test_sop_class_follows_modality_and_intent(gen_dir: Path) -> None:
    cr = pydicom.dcmread(dicomgen.make_chest(gen_dir / "c.dcm", modality="CR", rows=8, cols=8))
    dx = pydicom.dcmread(dicomgen.make_chest(gen_dir / "d.dcm", rows=8, cols=8))
    raw = pydicom.dcmread(
        dicomgen.make_chest(gen_dir / "p.dcm", for_processing=True, rows=8, cols=8)
    )
    assert cr.SOPClassUID == dicomgen.CR_IMAGE_STORAGE
    assert dx.SOPClassUID == dicomgen.DX_FOR_PRESENTATION
    assert dx.PresentationIntentType == "FOR PRESENTATION"
    assert raw.SOPClassUID == dicomgen.DX_FOR_PROCESSING
    assert "WindowCenter" not in raw


def test_view_code_sequence_replaces_view_position(gen_dir: Path) -> None:
    ds = pydicom.dcmread(
        dicomgen.make_chest(gen_dir / "v.dcm", use_view_code=True, view="AP", rows=8, cols=8)
    )
    assert ds.ViewPosition == ""
    assert ds.ViewCodeSequence[0].CodeValue == "399348003"
    assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"


def test_phantom_has_dark_lungs_bright_spine_and_both_extremes() -> None:
    img = dicomgen.phantom(128, 128)
    boxes = dicomgen.regions(128, 128)
    assert img.min() == 0.0 and img.max() == 1.0
    assert (img == 0.0).mean() > 0.005 and (img == 1.0).mean() > 0.005
    lungs = max(img[boxes["right_lung"]].mean(), img[boxes["left_lung"]].mean())
    assert lungs < 0.4 < img[boxes["heart"]].mean() < img[boxes["spine"]].mean()


@pytest.mark.parametrize("kind", dicomgen.COMPRESSIONS)
@pytest.mark.parametrize("variant", ["dx_16bit", "cr_mono1_window", "dx_signed"])
def test_compressed_copies_decode_to_the_same_stored_values(
    gen_dir: Path, kind: str, variant: str
) -> None:
    src = dicomgen.make_chest(
        gen_dir / f"src-{variant}-{kind}.dcm", rows=64, cols=48, **UNCOMPRESSED_VARIANTS[variant]
    )
    dst = dicomgen.compress(src, gen_dir / f"{variant}-{kind}.dcm", kind)
    original = pydicom.dcmread(src)
    copy = pydicom.dcmread(dst)
    assert copy.file_meta.TransferSyntaxUID.is_compressed
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)
    _dcmdump(dst)


def test_compress_rejects_an_unknown_kind(gen_dir: Path) -> None:
    src = dicomgen.make_chest(gen_dir / "k.dcm", rows=8, cols=8)
    with pytest.raises(ValueError, match="kind must be one of"):
        dicomgen.compress(src, gen_dir / "k2.dcm", "jpeg-xl")


def test_non_chest_ct_and_pixelless_files_say_what_they_are(gen_dir: Path) -> None:
    hand = pydicom.dcmread(dicomgen.make_non_chest(gen_dir / "hand.dcm", rows=32, cols=32))
    ct = pydicom.dcmread(dicomgen.make_ct(gen_dir / "ct.dcm", rows=16, cols=16))
    bare = pydicom.dcmread(dicomgen.make_no_pixels(gen_dir / "bare.dcm", rows=16, cols=16))
    assert (hand.Modality, hand.BodyPartExamined) == ("DX", "HAND")
    assert ct.SOPClassUID == dicomgen.CT_IMAGE_STORAGE and ct.pixel_array.dtype == np.int16
    assert bare.Modality == "CR" and "PixelData" not in bare and bare.Rows == 16


def test_truncated_and_garbage_files_are_not_readable_dicom(gen_dir: Path) -> None:
    src = dicomgen.make_chest(gen_dir / "t.dcm", rows=64, cols=64)
    cut = dicomgen.truncate(src, gen_dir / "cut.dcm", 0.5)
    assert cut.stat().st_size == src.stat().st_size // 2
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises several types here
        pydicom.dcmread(cut).pixel_array  # noqa: B018
    junk = dicomgen.make_garbage(gen_dir / "junk.bin", 2048)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(junk)


def test_large_dx_files_share_pixels_but_not_uids(gen_dir: Path) -> None:
    a = pydicom.dcmread(dicomgen.make_large_dx(gen_dir / "a.dcm", rows=300, cols=200))
    b = pydicom.dcmread(
        dicomgen.make_large_dx(gen_dir / "b.dcm", rows=300, cols=200, patient_id="P2")
    )
    assert a.PixelData == b.PixelData and len(a.PixelData) == 300 * 200 * 2
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID
    assert b.PatientID == "P2" and a.PatientID == "ANON1"


def test_pydicom_data_radiographs_are_the_documented_real_images() -> None:
    chest = pydicom.dcmread(dicomgen.pydicom_data_chest("RG1_UNCR"), stop_before_pixels=True)
    tibia = pydicom.dcmread(dicomgen.pydicom_data_chest("RG3_UNCR"), stop_before_pixels=True)
    j2k = pydicom.dcmread(dicomgen.pydicom_data_chest("RG1_J2KR"), stop_before_pixels=True)
    assert (chest.Rows, chest.Columns, chest.BitsStored) == (1955, 1841, 15)
    assert chest.PhotometricInterpretation == "MONOCHROME1" and chest.BodyPartExamined == "CHEST"
    assert tibia.BodyPartExamined != "CHEST"
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize("variant", ["dx_mono2_window", "cr_mono1_window", "dx_for_processing"])
def test_generated_chests_have_no_iod_errors(gen_dir: Path, variant: str) -> None:
    path = dicomgen.make_chest(
        gen_dir / f"iod-{variant}.dcm", rows=32, cols=32, **UNCOMPRESSED_VARIANTS[variant]
    )
    proc = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
