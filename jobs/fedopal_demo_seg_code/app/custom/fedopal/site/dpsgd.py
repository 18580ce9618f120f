"""`privacy.mode: dpsgd`: the parts of DP-SGD (Abadi et al., CCS 2016) the one training loop (site.train) plugs in.

Why every trained tensor: the global adapter's updates leave the site, but the personal adapter and the personal head,
trained on the same data, shape every later gradient of the global one. DP-SGD on the global adapter alone would
leave that path unprotected, so every trained tensor takes only clipped, noised per-unit gradients, and everything
the site later releases is post-processing of them.

The unit of privacy:
- **patient**, when the site's manifest has a `patient_id` column: each step samples patients (Poisson, rate q: each
  patient independently), takes all their images, sums each patient's per-image gradients and clips that sum to C
  (user-level DP-SGD, as DP-FedAvg clips per user: McMahan et al., ICLR 2018). Epsilon is per patient, however many
  images a patient has.
- **image**, without it: Opacus's own Poisson sampling of images (DPDataLoader) and per-image clipping. A patient
  with k images is then protected at about k x epsilon; every output says "per image".

Per step, through Opacus (GradSampleModule, strict validation of the trained modules, and DPOptimizer): per-image
gradients of the mean loss, summed per patient where there is one, clipped to C, summed, N(0, (sigma C)^2) added,
divided by the expected number of units per batch (q x units). Data-free terms are post-processing: fedopal_w's
weight-orthogonality gradient is added after the noise, fedopal_p's projection runs after the step.
Accounting: Opacus's PRV (or RDP) accountant for rounds x steps compositions of the subsampled Gaussian mechanism at
rate q = batch_size / images (so a batch holds batch_size images on average), add/remove one unit.

Written by hand, and why: Opacus samples and clips records; it has no user-level (per-patient) sampler or clipping.
`PatientPoissonSampler` and `sum_per_patient` are that, and nothing else.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch.utils.data import Dataset


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy: DP noise and sampling the server cannot replay."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class PatientPoissonSampler(torch.utils.data.Sampler):
    """Batches of dataset indices: each patient in the batch independently with probability `sample_rate`, with all
    of its images. `patient_of`: the patient index (0..P-1) of each dataset row. int(1 / sample_rate) batches per
    pass, as Opacus's UniformWithReplacementSampler."""

    def __init__(self, patient_of: list[int], sample_rate: float, generator: torch.Generator):
        self.rows = {}
        for row, patient in enumerate(patient_of):
            self.rows.setdefault(patient, []).append(row)
        self.patients = sorted(self.rows)
        self.sample_rate = sample_rate
        self.generator = generator

    def __len__(self) -> int:
        return int(1 / self.sample_rate)

    def __iter__(self):
        for _ in range(len(self)):
            chosen = torch.rand(len(self.patients), generator=self.generator) < self.sample_rate
            yield [row for p, c in zip(self.patients, chosen.tolist()) if c for row in self.rows[p]]


class RowIndexed(Dataset):
    """The dataset with each item's row number added ("row"), so a batch says whose images it holds."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "row": index}


def patient_loader(dataset, patient_of: list[int], sample_rate: float, num_workers: int = 0):
    """Poisson-sampled batches of patients (all their images), empty batches kept (Opacus's collate wrapper)."""
    from opacus.data_loader import wrap_collate_with_empty
    from torch.utils.data._utils.collate import default_collate

    return torch.utils.data.DataLoader(
        RowIndexed(dataset), batch_sampler=PatientPoissonSampler(patient_of, sample_rate, entropy_generator()),
        collate_fn=wrap_collate_with_empty(collate_fn=default_collate), num_workers=num_workers)


def sum_per_patient(params, patients: torch.Tensor) -> None:
    """Replace each parameter's per-image gradients (Opacus's p.grad_sample, rows = images of the batch) by
    per-patient sums (rows = the batch's distinct patients, in order of first appearance), so that DPOptimizer clips
    and noises patients, not images. patients: (B,) patient index of each image row."""
    _, inverse = torch.unique(patients, sorted=False, return_inverse=True)
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    for p in params:
        g = getattr(p, "grad_sample", None)
        if g is None:
            continue
        summed = torch.zeros((count, *g.shape[1:]), dtype=g.dtype, device=g.device)
        p.grad_sample = summed.index_add_(0, inverse.to(g.device), g)


def unit_count(patient_of: list[int] | None, num_images: int) -> int:
    return len(set(patient_of)) if patient_of is not None else num_images


def expected_units(sample_rate: float, units: int) -> int:
    """DPOptimizer's expected batch size: the mean number of units (patients or images) a Poisson batch holds."""
    return max(1, math.ceil(sample_rate * units))
