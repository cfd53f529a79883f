"""`cxrnode demo`: a synthetic chest radiograph to try a node with, written and optionally sent.

A newcomer who has just run `scripts/serve` (or `docker compose up`) needs an image to send.
Real radiographs are patient data; the one in PyPI's ``pydicom-data`` comes only with the test
extra. This command draws a plain phantom instead (thorax, lungs, heart, spine, ribs and
diaphragm on a 12-bit CR, PA view, BodyPartExamined CHEST), with fresh UIDs at every call so
each one is a new study. The model's draft for it means nothing: it is a drawing.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrnode.cli.common import load_settings

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DEMO_CALLING_AET = "CXRDEMO"


def phantom(size: int = 1536, seed: int | None = None) -> np.ndarray:
    """A PA chest phantom, uint16 with 12 bits used (bright = dense, as MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # 0..1, y down
    image = np.full((size, size), 250.0, dtype=np.float32)  # air

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    image[ellipse(0.5, 0.55, 0.46, 0.52)] = 1900.0  # soft tissue of the thorax
    for cx in (0.31, 0.69):  # lungs, darker, with a soft edge
        inside = ellipse(cx, 0.47, 0.15, 0.31)
        image[inside] = 700.0 + 300.0 * np.abs(y[inside] - 0.45)
    image[ellipse(0.54, 0.66, 0.13, 0.12)] = 2500.0  # heart, a little to the left of the image
    image[ellipse(0.5, 0.35, 0.05, 0.2)] = 2300.0  # mediastinum
    image[(np.abs(x - 0.5) < 0.025) & (y > 0.08)] = 2900.0  # spine
    for cx in (0.31, 0.69):  # diaphragm domes
        image[ellipse(cx, 0.86, 0.17, 0.09) & (y > 0.77)] = 2100.0
    for k in range(9):  # ribs: gentle arcs over each lung
        for side in (-1, 1):
            curve = 0.16 + 0.07 * k + 0.48 * (x - 0.5) ** 2
            band = (np.abs(y - curve) < 0.009) & (side * (x - 0.5) > 0.03)
            band &= side * (x - 0.5) < 0.33
            image[band] += 500.0
    image += rng.normal(0.0, 25.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 4095).astype(np.uint16)


#: Width of the demo phantom's field of view (an adult chest PA detector is 35-43 cm).
DEMO_FIELD_MM = 384.0


def chest_dataset(size: int = 1536) -> FileDataset:
    """A CR Image Storage dataset of :func:`phantom`, with fresh UIDs."""
    now = datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "DEMO^CHEST"
    ds.PatientID = "CXRNODE-DEMO"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = "045Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "DEMO"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.Manufacturer = "cxrnode demo phantom"
    ds.StudyDescription = "XR CHEST PA (synthetic demo image)"
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    pixels = phantom(size)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    spacing = round(DEMO_FIELD_MM / size, 4)  # a 38 cm chest at any matrix size
    ds.PixelSpacing = [spacing, spacing]
    ds.WindowCenter = 1800
    ds.WindowWidth = 3400
    ds.PixelData = pixels.tobytes()
    return ds


def demo_command(
    file: Annotated[
        Path | None,
        typer.Argument(help="Where to write the image (default: a new file in the temp dir)."),
    ] = None,
    send: Annotated[
        bool, typer.Option("--send", help="C-STORE it to this node (AE_TITLE, DICOM_PORT).")
    ] = False,
    to: Annotated[
        str | None,
        typer.Option(help="C-STORE it to AET@host:port instead (e.g. the PACS that routes)."),
    ] = None,
    calling: Annotated[
        str, typer.Option(help="Our calling AE title when sending.")
    ] = DEMO_CALLING_AET,
) -> None:
    """Write a synthetic chest radiograph (a new study each time) and optionally send it."""
    from cxrnode.settings import parse_destination

    ds = chest_dataset()
    if file is None:
        descriptor, name = tempfile.mkstemp(prefix="cxrnode-demo-", suffix=".dcm")
        os.close(descriptor)
        file = Path(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(file, enforce_file_format=True)
    typer.echo(f"wrote {file} (synthetic CR chest PA, study {ds.StudyInstanceUID})")
    if not (send or to):
        return
    settings = load_settings()
    if to:
        try:
            aet, host, port = parse_destination(to)
        except ValueError as exc:
            typer.echo(f"cxrnode demo: {exc}", err=True)
            raise typer.Exit(2) from exc
    else:
        aet, host, port = settings.ae_title, "127.0.0.1", settings.dicom_port
    _store(ds, aet, host, port, calling)


def _store(ds: FileDataset, aet: str, host: str, port: int, calling: str) -> None:
    from pynetdicom import AE

    from cxrnode.net.requestor import associate

    ae = AE(ae_title=calling)
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    assoc = associate(ae, host, port, ae_title=aet)
    where = f"{aet}@{host}:{port}"
    if not assoc.is_established:
        if assoc.is_rejected:
            typer.echo(
                f"C-STORE to {where}: association rejected. If the node has an allow-list, add "
                f"{calling} to CXRNODE_ALLOWED_CALLING_AETS or pass --calling with an allowed "
                "AE title.",
                err=True,
            )
        else:
            typer.echo(f"C-STORE to {where}: no association (is the node running?)", err=True)
        raise typer.Exit(1)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        typer.echo(f"C-STORE to {where}: failed (status {code})", err=True)
        raise typer.Exit(1)
    typer.echo(f"C-STORE to {where}: success; `cxrnode status` shows the study")
