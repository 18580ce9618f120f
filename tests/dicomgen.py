"""Anonymized DICOM files written with pydicom for the tests (no patient data; nothing committed).

Each file is a plain secondary-capture or CT image with only the tags a reader needs: the pixel module, optional
rescale and window, and, for series slices, InstanceNumber and the patient-space geometry.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path, pixels: np.ndarray, *, bits_stored: int | None = None, photometric: str | None = None,
                slope: float | None = None, intercept: float | None = None, window: tuple | None = None,
                instance: int | None = None, position: tuple | None = None, spacing=(0.7, 0.8),
                transfer_syntax=ExplicitVRLittleEndian, frames: int | None = None, series_uid: str | None = None):
    """pixels: (rows, cols) gray, (rows, cols, 3) RGB, or (frames, rows, cols) with frames set."""
    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if slope is not None else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Anonymous"
    ds.PatientID = "ANON"
    ds.Modality = "CT" if slope is not None else "OT"
    rgb = pixels.ndim == 3 and frames is None
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 1.0
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if transfer_syntax != ExplicitVRLittleEndian:
        # a compressed syntax whose decoder is missing: valid encapsulated framing around unusable bytes
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return str(path)


def write_series(folder, volume: np.ndarray, *, shuffle_names: bool = True, **tags) -> str:
    """volume: (rows, cols, slices) -> one file per slice; file names in a shuffled order, so that reading in name
    order would give the wrong volume (the reader must sort by InstanceNumber)."""
    import os

    os.makedirs(folder, exist_ok=True)
    n = volume.shape[-1]
    order = np.random.default_rng(0).permutation(n) if shuffle_names else np.arange(n)
    uid = generate_uid()
    for k in range(n):
        write_dicom(os.path.join(folder, f"IM{order[k]:04d}"), volume[..., k], instance=k + 1,
                    position=(0.0, 0.0, 2.5 * k), series_uid=uid, **tags)
    return str(folder)
