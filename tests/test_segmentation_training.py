"""Segmentation at a site: the pipeline moves image and mask together, the metrics agree with an independent float64
computation, and the one trainer learns a synthetic task (MONAI's create_test_image_2d/3d: fast tests only)."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d, create_test_image_3d
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist

from fedopal.config import config_from_dict
from fedopal.model.adapters import build_model
from fedopal.site.data import build_datasets, read_manifest
from fedopal.site.segment import per_image_scores, segmentation_metrics
from fedopal.site.train import SiteTrainer
from fedopal.specs.methods import get_method

SPLITS = ["train"] * 12 + ["val"] * 4 + ["test"] * 4


def write_png_site(folder, n=20, size=48, seed=0):
    """PNG images (8-bit) and label-map PNGs (0 background, 1 circle), manifest path,mask,split."""
    rng = np.random.RandomState(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = ["path,mask,split"]
    for i in range(n):
        img, seg = create_test_image_2d(size, size, num_objs=1, rad_max=14, rad_min=8, noise_max=0.2,
                                        num_seg_classes=1, random_state=rng)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray(seg.astype(np.uint8)).save(folder / "masks" / f"{i}.png")
        rows.append(f"images/{i}.png,masks/{i}.png,{SPLITS[i % len(SPLITS)]}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def cfg_2d(**data):
    return config_from_dict({"data": {"task": "segmentation", "image_size": 32, "class_names": ["background", "disc"],
                                      "batch_size": 6, **data},
                             "model": {"backbone": "unetr", "pretrained": False,
                                       "vit": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3}, "lora_rank": 4},
                             "train": {"method": "fedopal_w", "local_steps": 25, "lr": 0.01}})


def _reference_hd95(pred: np.ndarray, ref: np.ndarray) -> float:
    """HD95 in float64 from scratch: boundary pixels (the object minus its erosion), all pairwise distances, the 95th
    percentile of each directed set, the larger of the two (MONAI's definition, Huttenlocher et al. 1993)."""
    def border(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m))
    a, b = border(pred), border(ref)
    d = cdist(a.astype(np.float64), b.astype(np.float64))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_and_hd95_agree_with_a_float64_reference():
    rng = np.random.RandomState(3)
    refs, preds = [], []
    for _ in range(4):
        _, ref = create_test_image_2d(40, 40, num_objs=2, rad_max=9, num_seg_classes=2, random_state=rng)
        pred = ndimage.shift(ref, (rng.randint(-3, 4), rng.randint(-3, 4)), order=0)
        refs.append(ref)
        preds.append(pred)
    ref, pred = np.stack(refs)[:, None], np.stack(preds)[:, None]
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred[:, 0]).long(), 3).permute(0, 3, 1, 2).float()
    dice, hd95 = per_image_scores(logits, torch.as_tensor(ref).float(), 3)
    for i in range(4):
        for k in (1, 2):
            p, r = pred[i, 0] == k, ref[i, 0] == k
            if not p.any() and not r.any():
                assert dice[i, k - 1] == 1.0 and math.isnan(hd95[i, k - 1])
                continue
            assert dice[i, k - 1] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-6)
            if p.any() and r.any():
                assert hd95[i, k - 1] == pytest.approx(_reference_hd95(p, r), abs=1e-4)
    metrics = segmentation_metrics(dice, hd95, lambda k: ["bg", "a", "b"][k])
    assert metrics["dice"] == pytest.approx(dice.mean())
    assert metrics["dice/a"] == pytest.approx(dice[:, 0].mean())


def test_pipeline_moves_image_and_mask_together(tmp_path):
    """The image's bright disc and its mask stay on each other through resizing and random affine augmentation; the
    mask keeps its class indices (nearest neighbour)."""
    manifest = write_png_site(tmp_path / "site-1")
    cfg = cfg_2d(image_size=40)
    samples = read_manifest(str(manifest), 2, ["background", "disc"], task="segmentation")
    assert samples[0].mask.endswith("masks/0.png")
    train = build_datasets(cfg.data, samples, 1, None, str(manifest))["train"]
    for epoch in range(3):
        train.augment_seed = epoch
        for i in range(6):
            item = train[i]
            image, mask = item["image"][0].numpy(), item["mask"][0].numpy()
            assert image.shape == mask.shape == (40, 40)
            assert set(np.unique(mask)) <= {0.0, 1.0}
            # the disc is bright (about 1) on a dark noisy background: thresholding the image gives the mask back
            iou = ((image > 0.5) & (mask > 0)).sum() / max(((image > 0.5) | (mask > 0)).sum(), 1)
            assert iou > 0.7, (epoch, i, iou)


def test_trainer_learns_synthetic_discs_and_reports_segmentation_metrics(tmp_path):
    manifest = write_png_site(tmp_path / "site-1", n=20, size=32)
    cfg = cfg_2d()
    samples = read_manifest(str(manifest), 2, ["background", "disc"], task="segmentation")
    model = build_model(cfg, get_method("fedopal_w"), "site-1")
    datasets = build_datasets(cfg.data, samples, 1, None, str(manifest))
    trainer = SiteTrainer(model, datasets, cfg.train, cfg.data.batch_size, class_name=cfg.data.class_name)
    before = trainer.evaluate(("test",))["personalized/test/dice"]
    stats = trainer.train_round()
    after = trainer.evaluate()
    assert math.isfinite(stats["task_loss"]) and stats["steps"] == 25
    for key in ("personalized/test/dice", "personalized/test/dice/disc", "personalized/test/hd95",
                "global_only/val/dice", "personalized/test/dice_ci_low", "personalized/test/dice_ci_high"):
        assert key in after, key
    assert after["personalized/test/dice"] > max(before, 0.6), (before, after["personalized/test/dice"])
    assert after["personalized/test/dice_ci_low"] <= after["personalized/test/dice"] <= \
        after["personalized/test/dice_ci_high"]


def test_3d_patches_and_sliding_window(tmp_path):
    """3D NIfTI volume + label map; training on roi_size patches, evaluation over the whole volume by sliding
    window gives a full-size prediction."""
    folder = tmp_path / "site-1"
    folder.mkdir()
    rows = ["path,mask,split"]
    rng = np.random.RandomState(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i, split in enumerate(["train"] * 3 + ["val", "test"]):
        img, seg = create_test_image_3d(32, 32, 32, num_objs=2, rad_max=8, num_seg_classes=1, random_state=rng)
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), folder / f"{i}.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), folder / f"{i}_seg.nii.gz")
        rows.append(f"{i}.nii.gz,{i}_seg.nii.gz,{split}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = config_from_dict({"data": {"task": "segmentation", "spatial_dims": 3, "image_size": 32, "roi_size": 16,
                                     "batch_size": 2, "augment": False},
                            "model": {"backbone": "unetr", "pretrained": False,
                                      "vit": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3}, "lora_rank": 4},
                            "train": {"method": "fedavg_lora", "local_steps": 2}})
    samples = read_manifest(str(folder / "manifest.csv"), 2, task="segmentation")
    datasets = build_datasets(cfg.data, samples, 1, None)
    assert tuple(datasets["train"][0]["image"].shape) == (1, 16, 16, 16)  # a patch
    assert tuple(datasets["test"][0]["mask"].shape) == (1, 32, 32, 32)  # the whole volume
    model = build_model(cfg, get_method("fedavg_lora"), "site-1")
    trainer = SiteTrainer(model, datasets, cfg.train, 2, roi_size=16)
    trainer.train_round()
    metrics = trainer.evaluate(("test",))
    assert 0.0 <= metrics["personalized/test/dice"] <= 1.0


def test_predicting_a_dicom_series_writes_a_dicom_seg_on_its_instances(tmp_path):
    """A DICOM series in, a DICOM SEG out (highdicom), referencing the series' instances: read back on the series'
    grid it is the label map written beside it as NIfTI."""
    from test_masks import _ct_series

    from fedopal.site.data import Sample
    from fedopal.site.masks import decode_mask
    from fedopal.site.readers import DecodeOptions, decode
    from fedopal.site.segment_predict import predict_masks

    volume = np.random.default_rng(0).integers(0, 1000, (20, 18, 8)).astype(np.int16)
    _ct_series(tmp_path / "series", volume)
    cfg = config_from_dict({"data": {"task": "segmentation", "spatial_dims": 3, "image_size": 16,
                                     "class_names": ["background", "organ"]},
                            "model": {"backbone": "unetr", "pretrained": False,
                                      "vit": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3}}})
    model = build_model(cfg, get_method("fedavg_lora"), "site-1")
    torch.nn.init.constant_(model.head.out.conv.conv.bias, 0.0)
    model.head.out.conv.conv.bias.data[1] = 0.05  # a little foreground everywhere the decoder is unsure
    (row,) = predict_masks(model, cfg, [Sample(str(tmp_path / "series"), -1, "")], str(tmp_path / "out"))
    assert row["mask_written"].endswith(".seg.dcm")
    nifti = nib.load(row["mask_written"].removesuffix(".seg.dcm") + ".nii.gz")
    labels = np.asarray(nifti.dataobj)
    assert labels.shape == volume.shape and labels.any()
    image, _ = decode(str(tmp_path / "series"), DecodeOptions(3, 1))
    seg, info = decode_mask(row["mask_written"], 3, 2, like=image)
    assert info.format == "dicom-seg"
    assert np.array_equal(seg[0].numpy(), labels)
    np.testing.assert_allclose(nifti.affine, image.affine.numpy(), atol=1e-5)


def test_a_segmentation_export_and_its_merged_copy_give_the_same_masks(tmp_path):
    from fedopal.site.export import export_site_model, load_exported

    cfg = cfg_2d(image_size=32)
    model = build_model(cfg, get_method("fedopal_w"), "site-1")
    with torch.no_grad():  # a trained-looking model: B and the decoder moved away from their init
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    export_site_model(model, cfg, str(tmp_path / "export"), 0, {}, merged=True)
    x = torch.rand(2, 1, 32, 32)
    adapters, _, _ = load_exported(str(tmp_path / "export" / "personalized"))
    merged, _, _ = load_exported(str(tmp_path / "export" / "personalized"), merged=True)
    with torch.no_grad():
        reference = model.eval()(x)
        torch.testing.assert_close(adapters(x), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(x), reference, rtol=0, atol=1e-4)
