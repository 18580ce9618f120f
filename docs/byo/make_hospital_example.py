"""Two hospital exports made from the demo federation, shaped like the real thing (README, "Bring your own site
data"): hospital-a exports 12-bit MONOCHROME1 DICOM (one file per image, no patient data), hospital-b RGB JPEGs;
both manifests use class names, and hospital-a's was saved by a spreadsheet (UTF-8 BOM, CRLF).

    python docs/byo/make_hospital_example.py --demo data/demo_federation --out workspace/byo
"""

import argparse
import csv
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

NAMES = ("normal", "pneumonia")


def write_dicom(path: str, gray8: np.ndarray) -> None:
    """12 bits stored in 16, MONOCHROME1 (0 is white), as many CR/DX exports; anonymized."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Anonymous", "ANON", "DX"
    ds.Rows, ds.Columns = gray8.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = ((255 - gray8.astype(np.int64)) * 4095 // 255).astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def convert(demo_site: str, out_site: str, kind: str, spreadsheet: bool) -> None:
    with open(os.path.join(demo_site, "manifest.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    folder = os.path.join(out_site, kind)
    os.makedirs(folder, exist_ok=True)
    out_rows = []
    for i, row in enumerate(rows):
        gray = np.asarray(Image.open(os.path.join(demo_site, row["path"])))
        name = f"{kind}/img_{i:05d}." + ("dcm" if kind == "dicom" else "jpg")
        if kind == "dicom":
            write_dicom(os.path.join(out_site, name), gray)
        else:
            Image.fromarray(np.stack([gray] * 3, -1)).save(os.path.join(out_site, name), quality=95)
        out_rows.append([name, NAMES[int(row["label"])], row["split"]])
    with open(os.path.join(out_site, "manifest.csv"), "w", newline="",
              encoding="utf-8-sig" if spreadsheet else "utf-8") as f:
        csv.writer(f, lineterminator="\r\n" if spreadsheet else "\n").writerows([["path", "label", "split"]] + out_rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="data/demo_federation")
    p.add_argument("--out", default="workspace/byo")
    args = p.parse_args()
    convert(os.path.join(args.demo, "site-1"), os.path.join(args.out, "hospital-a"), "dicom", spreadsheet=True)
    convert(os.path.join(args.demo, "site-4"), os.path.join(args.out, "hospital-b"), "jpeg", spreadsheet=False)
    print(f"written: {args.out}/hospital-a (DICOM), {args.out}/hospital-b (JPEG)")


if __name__ == "__main__":
    main()
