"""Masked loss: the loss masks follow their images through resize, crop and flip, come from the images'
transparency (`alpha_mask`) or from mask images (`masked_loss` + `conditioning_data_dir`), and weight the loss of
each latent pixel as sd-scripts' `apply_masked_loss` does; bad mask folders are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lorakit
from lorakit.config import TrainConfig
from lorakit.data.dataset import TrainDataset
from lorakit.errors import ConfigError, DatasetError

pytestmark = pytest.mark.usefixtures("one_thread")


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    return np.stack([(base[c] + 80 * np.sin(xx / (4 + c) + yy / 5)) % 256 for c in range(3)], -1).astype(np.uint8)


def rgba(w: int, h: int, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([pattern(w, h), alpha.astype(np.uint8)]), "RGBA")


def area_mask(values: np.ndarray, f: int = 8) -> torch.Tensor:
    """The oracle: mean over each f×f patch (what area interpolation to the latent size gives), [1, h/f, w/f]."""
    h, w = values.shape
    return torch.from_numpy(values.reshape(h // f, f, w // f, f).mean(axis=(1, 3)).astype(np.float32))[None]


def dataset(tmp_path, **kw) -> TrainDataset:
    cfg = TrainConfig.from_dict(dict(output_dir=str(tmp_path / "out"), max_train_steps=1, cache_latents=False, **kw))
    return TrainDataset.from_config(cfg, native_resolution=64)


def test_alpha_masks_are_cropped_and_flipped_with_their_images(tmp_path):
    d = tmp_path / "data" / "1_sks toy"
    d.mkdir(parents=True)
    alpha = np.zeros((32, 80))
    alpha[:, 30:] = 255  # opaque from x = 30 on
    alpha[:8, 60:] = 127  # a half-transparent corner at the top right
    rgba(80, 32, alpha).save(d / "a.png")
    ds = dataset(tmp_path, train_data_dir=str(d.parent), resolution="64,32", alpha_mask=True)
    # 80x32 into 64x32: resized to cover (no change here), centre-cropped to x in [8, 72)
    expected = area_mask(alpha[:, 8:72] / 255.0)
    assert expected[0, 0, 2].item() == pytest.approx(0.25)  # latent column 2 covers x 24..31 of the crop
    torch.testing.assert_close(ds.mask(0), expected)
    torch.testing.assert_close(ds.mask(0, flip=True), expected.flip(-1))
    batch = ds.load([0], epoch=0, position=0)
    assert batch.masks.shape == (1, 1, 4, 8)
    torch.testing.assert_close(batch.masks[0], expected)
    note = [n for p, n in ds.report.notes if p.endswith("a.png")]
    assert note == ["transparent: composited on white; its transparency is its loss mask"]


def test_alpha_masks_with_bucketing_and_resizing(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    alpha = np.full((128, 96), 255)
    alpha[:64] = 0  # the top half transparent
    rgba(96, 128, alpha).save(d / "a.png")
    (d / "a.txt").write_text("a toy")
    ds = dataset(tmp_path, train_data_dir=str(d), resolution="64", alpha_mask=True, enable_bucket=True,
                 min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=8)
    bucket, resized = ds.examples[0].choice.bucket, ds.examples[0].choice.resized
    mask = ds.mask(0)
    assert mask.shape == (1, bucket[1] // 8, bucket[0] // 8)
    # the resized image's top half is transparent: the top half of the rows of latent pixels is 0, the rest 1
    rows = mask[0].mean(dim=1)
    top = (resized[1] // 2 - (resized[1] - bucket[1]) // 2) / 8  # the boundary's row in the cropped image
    assert rows[: int(top)].max().item() == 0.0 and rows[int(np.ceil(top)):].min().item() == 1.0


def test_images_without_transparency_count_whole_and_a_subset_without_any_is_noted(tmp_path):
    d = tmp_path / "data" / "1_sks toy"
    d.mkdir(parents=True)
    Image.fromarray(pattern(64, 64)).save(d / "a.png")
    ds = dataset(tmp_path, train_data_dir=str(d.parent), alpha_mask=True)
    assert torch.equal(ds.mask(0), torch.ones(1, 8, 8))
    assert any("no image here has transparency" in n for _, n in ds.report.notes)


def test_mask_images_from_conditioning_data_dir(tmp_path):
    """The mask's red channel weights the loss (sd-scripts' rule); DreamBooth folders find theirs in a sub-folder
    of the same name, else in the mask folder itself; reg images, without masks, count whole."""
    data, masks, reg = tmp_path / "data", tmp_path / "masks", tmp_path / "reg" / "1_toy"
    for folder in (data / "1_sks toy", data / "2_sks cat", masks / "1_sks toy", reg):
        folder.mkdir(parents=True)
    Image.fromarray(pattern(64, 64)).save(data / "1_sks toy" / "a.png")
    Image.fromarray(pattern(64, 64, 1)).save(data / "2_sks cat" / "b.jpg")
    Image.fromarray(pattern(64, 64, 2)).save(reg / "r.png")
    red = np.tile(np.linspace(0, 255, 64).round(), (64, 1))
    Image.fromarray(np.dstack([red, np.zeros((64, 64)), np.full((64, 64), 255)]).astype(np.uint8)).save(
        masks / "1_sks toy" / "a.png")
    Image.fromarray(np.full((32, 32), 51, np.uint8), "L").save(masks / "b.webp")  # half the size: resized
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(masks / "stray.png")
    ds = dataset(tmp_path, train_data_dir=str(data), reg_data_dir=str(reg.parent), masked_loss=True,
                 conditioning_data_dir=str(masks))
    by_name = {ex.item.path.name: i for i, ex in enumerate(ds.examples)}
    torch.testing.assert_close(ds.mask(by_name["a.png"]), area_mask(red / 255.0))
    torch.testing.assert_close(ds.mask(by_name["b.jpg"]), torch.full((1, 8, 8), 0.2))
    assert ds.examples[by_name["r.png"]].item.mask_path is None
    batch = ds.load([by_name["r.png"], by_name["b.jpg"]], epoch=0, position=0)
    torch.testing.assert_close(batch.masks, torch.stack([torch.ones(1, 8, 8), torch.full((1, 8, 8), 0.2)]))
    assert any("1 mask image(s) with no training image of that name: unused (stray.png)" in n
               for _, n in ds.report.notes)
    assert ds.load([by_name["r.png"]], epoch=0, position=0).masks is None  # no masked image: no masks at all


def test_bad_mask_folders_and_options_are_refused_by_name(tmp_path):
    data, masks = tmp_path / "data" / "1_sks toy", tmp_path / "masks"
    data.mkdir(parents=True)
    masks.mkdir()
    for name in ("a", "b"):
        Image.fromarray(pattern(64, 64)).save(data / f"{name}.png")
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(masks / "a.png")
    opts = dict(train_data_dir=str(data.parent), masked_loss=True, conditioning_data_dir=str(masks))
    with pytest.raises(DatasetError, match=r"1 image\(s\) of .*1_sks toy have no mask image in .*masks \(b.png\)"):
        dataset(tmp_path, **opts)
    Image.fromarray(np.zeros((64, 32), np.uint8), "L").save(masks / "b.png")
    with pytest.raises(DatasetError, match=r"mask image .*b.png is 32x64 but its image .*b.png is 64x64"):
        dataset(tmp_path, **opts)
    (masks / "b.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"mask image .*b.png: not an image"):
        dataset(tmp_path, **opts)
    with pytest.raises(ConfigError, match="conditioning_data_dir.*not a folder"):
        dataset(tmp_path, **{**opts, "conditioning_data_dir": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="set `masked_loss = true`"):
        TrainConfig(train_data_dir="x", conditioning_data_dir="masks")
    with pytest.raises(ConfigError, match="`masked_loss` reads a mask image per training image"):
        TrainConfig(train_data_dir="x", masked_loss=True)
    TrainConfig(train_data_dir="x", masked_loss=True, alpha_mask=True)  # transparency alone is a mask too


def test_dataset_toml_masks(tmp_path):
    """sd-scripts' dataset TOML: `conditioning_data_dir` per subset (beside the TOML), `alpha_mask` at any level."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "cut").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(pattern(64, 64)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8), "L").save(tmp_path / "m" / "a.png")
    alpha = np.zeros((64, 64))
    alpha[:, :32] = 255
    rgba(64, 64, alpha).save(tmp_path / "cut" / "c.png")
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nalpha_mask = true\n[[datasets]]\nresolution = 64\n'
                    '[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "sks toy"\nconditioning_data_dir = "m"\n'
                    '  alpha_mask = false\n'
                    '[[datasets.subsets]]\nimage_dir = "cut"\nclass_tokens = "sks toy"\n')
    ds = dataset(tmp_path, dataset_config=str(toml), masked_loss=True)
    by_name = {ex.item.path.name: i for i, ex in enumerate(ds.examples)}
    assert ds.examples[by_name["a.png"]].item.mask_path == (tmp_path / "m" / "a.png").resolve()
    assert not ds.examples[by_name["a.png"]].item.subset.alpha_mask
    torch.testing.assert_close(ds.mask(by_name["a.png"]), torch.ones(1, 8, 8))
    torch.testing.assert_close(ds.mask(by_name["c.png"]), area_mask(alpha / 255.0))
    with pytest.raises(ConfigError, match=r"ds.toml: `conditioning_data_dir` in \[\[datasets.subsets\]\] #1 .*set "
                                          r"`masked_loss = true`"):
        dataset(tmp_path, dataset_config=str(toml))
    toml.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "t"\n')
    with pytest.raises(ConfigError, match="no subset of ds.toml has a `conditioning_data_dir`"):
        dataset(tmp_path, dataset_config=str(toml), masked_loss=True)


def lora_weights(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def train_on(tmp_path, tiny_sd1_dir, name: str, image: Image.Image, mask: Image.Image | None = None, **opts):
    data = tmp_path / name / "data" / "1_sks toy"
    data.mkdir(parents=True)
    image.save(data / "a.png")
    if mask is not None:
        (tmp_path / name / "masks").mkdir()
        mask.save(tmp_path / name / "masks" / "a.png")
        opts.update(masked_loss=True, conditioning_data_dir=str(tmp_path / name / "masks"))
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data.parent),
                           output_dir=str(tmp_path / name / "out"), max_train_steps=3, sample_at_end=False,
                           learning_rate=1e-3, **opts)
    return lora_weights(result.lora_path), [row["loss"] for row in result.loss_history]


def test_the_masks_weight_the_loss_of_training(tmp_path, tiny_sd1_dir):
    """Known outcomes: a fully transparent image teaches nothing (loss 0, the up-projections stay at their zero
    start); an opaque image trains exactly as without alpha_mask; a uniform grey mask of value c scales the first
    step's loss by c (same seed, so the same prediction and target); any mask changes what is learned."""
    rgb = pattern(64, 64)
    plain, plain_loss = train_on(tmp_path, tiny_sd1_dir, "plain", Image.fromarray(rgb))
    clear, clear_loss = train_on(tmp_path, tiny_sd1_dir, "clear", rgba(64, 64, np.zeros((64, 64))), alpha_mask=True)
    assert clear_loss == [0.0, 0.0, 0.0]
    ups = [k for k in clear if k.endswith("lora_up.weight")]
    assert ups and all(not clear[k].any() for k in ups) and any(plain[k].any() for k in ups)
    opaque, opaque_loss = train_on(tmp_path, tiny_sd1_dir, "opaque", Image.fromarray(rgb), alpha_mask=True)
    assert opaque_loss == plain_loss and all(torch.equal(opaque[k], plain[k]) for k in plain)
    grey, grey_loss = train_on(tmp_path, tiny_sd1_dir, "grey", Image.fromarray(rgb),
                               mask=Image.fromarray(np.full((64, 64), 51, np.uint8), "L"))
    assert grey_loss[0] == pytest.approx(0.2 * plain_loss[0], rel=1e-5)
    assert any(not torch.equal(grey[k], plain[k]) for k in ups)
