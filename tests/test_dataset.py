"""Dataset layouts, captions, bad images, reg balancing, dataset TOML and the latent cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.config import TrainConfig
from lorakit.data.captions import process_caption, read_caption_file, split_tags
from lorakit.data.dataset import TrainDataset
from lorakit.data.folders import ImageItem, Subset, balance_reg_images
from lorakit.data.images import load_rgb
from lorakit.errors import ConfigError, DatasetError


def pattern(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A procedural image (smooth gradients + a seeded colour), so every file is different and decodable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    arr = np.stack([(base[c] + 80 * np.sin(xx / (7 + c) + yy / (5 + seed % 3))) % 256 for c in range(3)], -1)
    im = Image.fromarray(arr.astype(np.uint8), "RGB")
    return im.convert(mode) if mode != "RGB" else im


def one_image_folders(root, *names) -> None:
    """`root/<name>/0.png` for each name, each image different."""
    for name in names:
        (root / name).mkdir()
        pattern(64, 64, ord(name)).save(root / name / "0.png")


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_train_steps=1, resolution="64")
    base.update(kw)
    return TrainConfig.from_dict(base)


# ---------------------------------------------------------------- captions
def test_caption_processing_keeps_first_tokens():
    rng = random.Random(0)
    caption = "sks, dog, red collar, grass, sunny, park, ball"
    seen = set()
    for _ in range(30):
        out = process_caption(caption, shuffle=True, keep_tokens=2, rng=rng)
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    drops = [process_caption(caption, dropout_rate=0.5, rng=rng) for _ in range(400)]
    assert 120 < drops.count("") < 280
    assert process_caption(caption, shuffle=False, dropout_rate=0.0, rng=rng) == caption


def test_caption_file_encodings(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffcafé, dog\nsecond line\n".encode())
    assert read_caption_file(p)[0] == "café, dog"
    assert "2 lines" in read_caption_file(p)[1]
    p.write_bytes("caf\xe9".encode("cp1252"))
    caption, note = read_caption_file(p)
    assert caption == "café" and "not UTF-8" in note


# ---------------------------------------------------------------- layouts
def test_dreambooth_layout_with_reg_balancing(tmp_path):
    train = tmp_path / "train"
    (train / "3_sks dog").mkdir(parents=True)
    for i in range(2):
        pattern(64, 64, i).save(train / "3_sks dog" / f"{i}.png")
    (train / "3_sks dog" / "1.txt").write_text("sks dog on a beach")  # caption file overrides the folder tokens
    reg = tmp_path / "reg"
    (reg / "1_dog").mkdir(parents=True)
    for i in range(4):
        pattern(64, 64, 10 + i).save(reg / "1_dog" / f"r{i}.jpg")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(train), reg_data_dir=str(reg),
                                          prior_loss_weight=0.5), native_resolution=64)
    train_ex = [e for e in ds.examples if not e.item.subset.is_reg]
    reg_ex = [e for e in ds.examples if e.item.subset.is_reg]
    assert {e.item.caption for e in train_ex} == {"sks dog", "sks dog on a beach"}
    assert all(e.item.caption == "dog" for e in reg_ex)
    # 2 images x 3 repeats = 6 training draws per epoch; reg draws are balanced to 6 too
    assert sum(e.item.repeats for e in train_ex) == 6
    assert sum(e.item.repeats for e in reg_ex) == 6
    assert len(ds) == 12
    batch = ds.load(ds.batches(0)[0], epoch=0, position=0)
    assert batch.weights.tolist() == [0.5 if r else 1.0 for r in batch.is_reg]


def test_reg_images_beyond_the_training_draws_are_reported_unused(tmp_path):
    for folder, n in (("train/2_sks dog", 1), ("reg/1_dog", 5)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            pattern(64, 64, i).save(tmp_path / folder / f"{i}.png")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"),
                                          reg_data_dir=str(tmp_path / "reg")), native_resolution=64)
    assert sum(e.item.subset.is_reg for e in ds.examples) == 2
    assert "3 of 5 regularisation images are never drawn" in ds.report.format()


def test_reg_balancing_matches_sd_scripts_rule():
    sub, reg = Subset(image_dir=None), Subset(image_dir=None, is_reg=True)
    train = [ImageItem(None, "", sub, (1, 1), repeats=5)]
    regs = [ImageItem(None, "", reg, (1, 1), repeats=1) for _ in range(3)]
    used = balance_reg_images(train, regs)
    assert [r.repeats for r in used] == [2, 2, 1]  # first pass 3, then one more each until 5
    many = [ImageItem(None, "", reg, (1, 1), repeats=1) for _ in range(8)]
    assert len(balance_reg_images(train, many)) == 5  # extra reg images are not used


def test_caption_layout_and_metadata_jsonl(tmp_path):
    d = tmp_path / "caps"
    d.mkdir()
    for i in range(3):
        pattern(80, 64, i).save(d / f"img{i}.png")
    (d / "img0.txt").write_text("a red square")
    (d / "img1.txt").write_text("a blue square")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d)), native_resolution=64)
    caps = {e.item.path.name: e.item.caption for e in ds.examples}
    assert caps == {"img0.png": "a red square", "img1.png": "a blue square", "img2.png": ""}
    assert any("no caption" in n for p, n in ds.report.notes if p.endswith("img2.png"))
    (d / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"img{i}.png", "text": f"meta {i}"})
                                                for i in range(3)))
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d)), native_resolution=64)
    assert sorted(e.item.caption for e in ds.examples) == ["meta 0", "meta 1", "meta 2"]


def test_a_folder_named_by_its_repeats_alone_takes_its_captions_from_files(tmp_path):
    """sd-scripts reads `10/` as 10 repeats with no class tokens: the captions come from the caption files."""
    d = tmp_path / "train" / "10"
    d.mkdir(parents=True)
    for i in range(2):
        pattern(64, 64, i).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a photo of thing {i}")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train")), native_resolution=64)
    assert sorted((e.item.caption, e.item.repeats) for e in ds.examples) == [("a photo of thing 0", 10),
                                                                           ("a photo of thing 1", 10)]


def test_a_caption_file_named_in_another_case_or_unicode_form_is_found(tmp_path):
    """`IMG_0001.PNG` with `img_0001.txt` (cameras, Windows), `café.png` with a macOS (NFD) `café.txt`: found, as
    `prepare check` finds them; an exact name still wins, and two candidates leave the choice to no one."""
    import unicodedata

    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("IMG_0001.PNG", "café.png", "a.png", "A.png", "Both.png"):
        pattern(64, 64).save(d / name)
    (d / "img_0001.txt").write_text("a camera photo")
    (d / unicodedata.normalize("NFD", "café.txt")).write_text("a café")
    (d / "a.txt").write_text("lower")
    (d / "A.txt").write_text("upper")
    (d / "both.txt").write_text("one")
    (d / "BOTH.txt").write_text("two")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d)), native_resolution=64)
    captions = {unicodedata.normalize("NFC", e.item.path.name): e.item.caption for e in ds.examples}
    assert captions == {"IMG_0001.PNG": "a camera photo", "café.png": "a café", "a.png": "lower", "A.png": "upper",
                        "Both.png": ""}


def test_empty_and_misnamed_folders_are_refused_with_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "nope")), native_resolution=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(empty)), native_resolution=64)
    (empty / "sks dog").mkdir()
    pattern(64, 64).save(empty / "sks dog" / "a.png")
    with pytest.raises(DatasetError, match=r"not named `<repeats>_<identifier> <class>`.*10_sks dog"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(empty)), native_resolution=64)
    with pytest.raises(ConfigError, match="train_data_dir"):
        TrainDataset.from_config(cfg_for(tmp_path), native_resolution=64)


def test_bad_images_are_handled_or_listed(tmp_path):
    d = tmp_path / "train" / "2_ünïcode 狗"
    d.mkdir(parents=True)
    pattern(64, 64, 1).save(d / "good.png")
    pattern(64, 64, 2).convert("RGBA").save(d / "rgba.png")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red: must become white, not black
    rgba.save(d / "transparent.png")
    pattern(64, 64, 3).convert("CMYK").save(d / "cmyk.jpg")
    pattern(64, 64, 4).convert("P").save(d / "palette.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(d / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    pattern(96, 64, 5).save(d / "rotated.jpg", exif=exif)
    Image.new("RGB", (6000, 4000), (20, 200, 30)).save(d / "huge.png")  # large but legitimate: downscaled
    (d / "empty.png").write_bytes(b"")
    buf = (tmp_path / "full.jpg")
    pattern(64, 64, 7).save(buf)
    (d / "truncated.jpg").write_bytes(buf.read_bytes()[: len(buf.read_bytes()) // 2])
    (d / "notes.pdf").write_bytes(b"%PDF-1.4")
    (d / "fake.png").write_text("this is not a png")
    Image.new("1", (14000, 13000)).save(d / "bomb.png")  # over Pillow's decompression-bomb limit (2 × 89.5 MP)
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train")), native_resolution=64)
    used = {e.item.path.name for e in ds.examples}
    assert used == {"good.png", "rgba.png", "transparent.png", "cmyk.jpg", "palette.png", "sixteen.png",
                    "rotated.jpg", "huge.png"}
    skipped = {p.split("/")[-1]: r for p, r in ds.report.skipped}
    assert set(skipped) == {"empty.png", "truncated.jpg", "notes.pdf", "fake.png", "bomb.png"}
    assert "0 bytes" in skipped["empty.png"] and "truncated" in skipped["truncated.jpg"]
    assert "too large" in skipped["bomb.png"] and "not an image" in skipped["fake.png"]
    notes = "\n".join(f"{p}: {n}" for p, n in ds.report.notes)
    for name, what in [("rgba.png", "white"), ("cmyk.jpg", "CMYK"), ("sixteen.png", "8-bit"), ("rotated.jpg", "EXIF")]:
        assert any(name in line and what in line for line in notes.splitlines()), name
    assert load_rgb(d / "rotated.jpg").size == (64, 96)
    assert load_rgb(d / "transparent.png").getpixel((5, 5)) == (255, 255, 255)
    assert ds.examples[0].item.caption == "ünïcode 狗"
    # every handled image really loads at its bucket size
    for i in range(len(ds.examples)):
        assert ds.load([i], 0, 0) is not None
    assert "skipped (5)" in ds.report.format()


def test_only_bad_images_refused(tmp_path):
    d = tmp_path / "train" / "1_x"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable training images"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train")), native_resolution=64)


def test_batches_share_a_bucket_and_are_deterministic(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    sizes = [(128, 64), (64, 128), (96, 96), (130, 60), (60, 130), (100, 100)]
    for i, s in enumerate(sizes):
        pattern(*s, seed=i).save(d / f"{i}.png")
    cfg = cfg_for(tmp_path, train_data_dir=str(d), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                  bucket_reso_steps=16, train_batch_size=2, cache_latents=False)
    ds = TrainDataset.from_config(cfg, native_resolution=64)
    # table for area 64² in steps of 16 between 32 and 128: 32x128 48x80 64x64 80x48 96x32 112x32 128x32 (+flips);
    # aspect 2.0 and 2.17 -> 80x48 (1.67), 0.5 -> 48x80 (0.6), 0.46 -> 32x96 (0.33), squares -> 64x64
    assert ds.bucket_counts() == {"32x96": 1, "48x80": 1, "64x64": 2, "80x48": 2}
    assert ds.batches(3) == ds.batches(3) and ds.batches(3) != ds.batches(4)
    for pos, b in enumerate(ds.batches(0)):
        assert len({ds.examples[i].choice.bucket for i in b}) == 1
        batch = ds.load(b, 0, pos)
        w, h = ds.examples[b[0]].choice.bucket
        assert batch.pixels.shape == (len(b), 3, h, w)
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1


def test_bucket_limits_off_the_steps_are_rounded_and_noted(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for i, s in enumerate([(128, 64), (64, 128), (96, 96)]):
        pattern(*s, seed=i).save(d / f"{i}.png")
    cfg = cfg_for(tmp_path, train_data_dir=str(d), enable_bucket=True, min_bucket_reso=40, max_bucket_reso=120,
                  bucket_reso_steps=16, cache_latents=False)
    ds = TrainDataset.from_config(cfg, native_resolution=64)
    assert all(w % 16 == 0 and h % 16 == 0 and 32 <= min(w, h) and max(w, h) <= 128
               for w, h in (ex.choice.bucket for ex in ds.examples))
    assert "min_bucket_reso 40 → 32, max_bucket_reso 120 → 128" in ds.report.format()


def test_dataset_toml(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "regs").mkdir()
    for i in range(2):
        pattern(64, 64, i).save(tmp_path / "imgs" / f"{i}.png")
        pattern(64, 64, 9 + i).save(tmp_path / "regs" / f"{i}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
shuffle_caption = true
keep_tokens = 1
[[datasets]]
resolution = [64, 64]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "imgs"
  class_tokens = "sks cat"
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = "regs"
  class_tokens = "cat"
  is_reg = true
  keep_tokens = 0
""")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml), keep_tokens=3), native_resolution=64)
    train = [e for e in ds.examples if not e.item.subset.is_reg]
    reg = [e for e in ds.examples if e.item.subset.is_reg]
    assert train[0].item.subset.keep_tokens == 1 and reg[0].item.subset.keep_tokens == 0  # subset > general > cfg
    assert all(e.item.subset.shuffle_caption for e in ds.examples)
    assert train[0].batch_size == 2 and train[0].item.repeats == 4
    assert sum(e.item.repeats for e in reg) == 8
    toml.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nface_crop_aug_range = [1, 2]\n")
    with pytest.raises(ConfigError, match="face_crop_aug_range"):
        TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)


def test_dataset_toml_reads_sd_scripts_keys_that_are_off(tmp_path, capsys):
    """A GUI-made dataset TOML lists sd-scripts' keys at their off values (token warm-up 0, a multiplier of 1,
    caption_dropout_every_n_epochs 0): read with a note, as the train config reads them; on, refused by name."""
    (tmp_path / "imgs").mkdir()
    pattern(64, 64, 0).save(tmp_path / "imgs" / "0.png")
    toml = tmp_path / "dataset.toml"
    body = """
[general]
cache_info = false
caption_dropout_every_n_epochs = 0
[[datasets]]
resolution = 64
network_multiplier = {multiplier}
  [[datasets.subsets]]
  image_dir = "imgs"
  token_warmup_step = 0
  token_warmup_min = 1
  custom_attributes = {{}}
"""
    toml.write_text(body.format(multiplier="1.0"))
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert len(ds.examples) == 1 and ds.examples[0].item.subset.caption_dropout_every_n_epochs == 0
    err = capsys.readouterr().err
    assert "`cache_info` in [general] of dataset.toml is not used by lorakit" in err
    assert "token_warmup_step, token_warmup_min, custom_attributes" in err and "network_multiplier" in err
    toml.write_text(body.format(multiplier="0.5"))
    with pytest.raises(ConfigError, match=r"`network_multiplier` in \[\[datasets\]\] #1 of dataset.toml is set, but "
                                          "lorakit does not have a per-dataset LoRA multiplier"):
        TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert TrainConfig(caption_dropout_every_n_epochs=0).caption_dropout_every_n_epochs == 0


def test_latent_cache_on_disk_is_reused_and_invalidated(tmp_path, tiny_sd1_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd1_dir, subfolder="vae")
    d = tmp_path / "train" / "1_sks"
    d.mkdir(parents=True)
    for i in range(3):
        pattern(64, 64, i).save(d / f"{i}.png")
    cfg = cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"), cache_latents_to_disk=True, flip_aug=True)

    def run():
        ds = TrainDataset.from_config(cfg, native_resolution=64)
        return ds, ds.cache_latents(vae, 0.18215, to_disk=True)

    ds1, stats1 = run()
    assert stats1 == {"encoded": 3, "from_disk": 0}
    ds2, stats2 = run()
    assert stats2 == {"encoded": 0, "from_disk": 3}
    for i in range(3):
        assert torch.equal(ds1.cached[i]["latent"], ds2.cached[i]["latent"])
        assert not torch.equal(ds1.cached[i]["latent"], ds1.cached[i]["flipped"])
    pattern(64, 64, 99).save(d / "1.png")  # an edited image is re-encoded, the others are reused
    _, stats3 = run()
    assert stats3 == {"encoded": 1, "from_disk": 2}
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)  # another VAE: everything is re-encoded
    _, stats4 = run()
    assert stats4 == {"encoded": 3, "from_disk": 0}
    batch = ds2.load(ds2.batches(0)[0], 0, 0)
    assert batch.latents.shape == (1, 4, 8, 8) and batch.pixels is None


def test_bucket_range_and_config_conflicts_are_named(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    pattern(64, 64).save(d / "a.png")
    with pytest.raises(ConfigError, match="min_bucket_reso.*lower min_bucket_reso"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d), enable_bucket=True), native_resolution=64)
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n")
    with pytest.raises(ConfigError, match="either `dataset_config` or `train_data_dir`"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d), dataset_config=str(toml)),
                                 native_resolution=64)
    with pytest.raises(ConfigError, match="multiple of 8"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d), resolution="60"), native_resolution=64)


def test_sd_scripts_metadata_json_subset(tmp_path):
    (tmp_path / "ft").mkdir()
    for i in range(2):
        pattern(64, 64, i).save(tmp_path / "ft" / f"img{i}.jpg")
    (tmp_path / "meta.json").write_text(json.dumps({"img0": {"caption": "a cat"}, "img1.jpg": {"tags": "cat, sofa"},
                                                    "gone": {"caption": "missing file"}}))
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'ft'\n"
                    "metadata_file = 'meta.json'\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert sorted(e.item.caption for e in ds.examples) == ["a cat", "cat, sofa"]
    assert any(p.endswith("gone") and "missing" in r for p, r in ds.report.skipped)


def test_sd_scripts_metadata_jsonl_subset(tmp_path):
    """sd-scripts' JSONL metadata: one `{"image_path", "caption", "tags"}` object a line, paths relative to
    `image_dir` or absolute; caption and tags joined as in its JSON."""
    (tmp_path / "ft").mkdir()
    for i in range(3):
        pattern(64, 64, i).save(tmp_path / "ft" / f"img{i}.png")
    rows = [{"image_path": "img0.png", "caption": "a cat", "tags": "sofa", "image_size": [64, 64]},
            {"image_path": str(tmp_path / "ft" / "img1.png"), "caption": "a dog"},
            {"image_path": "img2.png", "tags": "bird, sky"}]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'ft'\n"
                    "metadata_file = 'meta.jsonl'\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert sorted((e.item.path.name, e.item.caption) for e in ds.examples) == [
        ("img0.png", "a cat, sofa"), ("img1.png", "a dog"), ("img2.png", "bird, sky")]
    (tmp_path / "meta.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(DatasetError, match="line 1: expected a JSON object with `file_name` .* or `image_path`"):
        TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)


def test_dataset_toml_scopes_num_repeats_and_class_tokens_like_sd_scripts(tmp_path):
    """sd-scripts lets `num_repeats` and `class_tokens` be set at dataset or [general] level, inherited by subsets."""
    one_image_folders(tmp_path, "a", "b")
    toml = tmp_path / "ds.toml"
    toml.write_text("[general]\nclass_tokens = 'sks dog'\n[[datasets]]\nresolution = 64\nnum_repeats = 3\n"
                    "[[datasets.subsets]]\nimage_dir = 'a'\n"
                    "[[datasets.subsets]]\nimage_dir = 'b'\nnum_repeats = 5\nclass_tokens = 'dog'\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    got = sorted((e.item.path.parent.name, e.item.repeats, e.item.caption) for e in ds.examples)
    assert got == [("a", 3, "sks dog"), ("b", 5, "dog")]


@pytest.mark.parametrize("line, message", [
    ("is_reg = 'maybe'", "`is_reg` must be true/false, got 'maybe'"),
    ("keep_tokens = 'one'", "`keep_tokens` must be an integer"),
    ("num_repeats = 'ten'", "`num_repeats` must be an integer"),
    ("num_repeats = -3", "`num_repeats` must be ≥ 0"),
    ("caption_dropout_rate = 5", "`caption_dropout_rate` must be ≤ 1"),
    ("caption_extension = 'txt'", "`caption_extension` must be a file extension starting with a dot"),
    ("color_aug = true", "`color_aug` in .* latents cannot be cached"),
])
def test_dataset_toml_values_are_checked_by_name(tmp_path, line, message):
    (tmp_path / "imgs").mkdir()
    pattern(64, 64).save(tmp_path / "imgs" / "0.png")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'imgs'\n{line}\n")
    with pytest.raises(ConfigError, match=message) as err:
        TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert "ds.toml" in str(err.value)


def test_dataset_toml_bad_shapes_and_dataset_values_are_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    pattern(64, 64).save(tmp_path / "imgs" / "0.png")
    toml = tmp_path / "ds.toml"
    cases = {
        "[datasets]\nbatch_size = 2\n": "must be an array of tables, written \\[\\[datasets\\]\\]",
        "[[datasets]]\nbatch_size = '2'\n[[datasets.subsets]]\nimage_dir = 'imgs'\n": None,  # a numeric string is 2
        "[[datasets]]\nbucket_reso_steps = 0\n[[datasets.subsets]]\nimage_dir = 'imgs'\n":
            "`bucket_reso_steps` must be ≥ 8",
        "[[datasets]]\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n[[datasets.subsets]]\nimage_dir = 'imgs'\n":
            "`min_bucket_reso` \\(512\\) must be ≤ `max_bucket_reso` \\(256\\)",
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nowhere'\n": "`image_dir` 'nowhere' .* not found",
    }
    for text, message in cases.items():
        toml.write_text(text)
        cfg = cfg_for(tmp_path, dataset_config=str(toml))
        if message is None:
            assert TrainDataset.from_config(cfg, native_resolution=64).examples[0].batch_size == 2
            continue
        with pytest.raises(ConfigError, match=message):
            TrainDataset.from_config(cfg, native_resolution=64)


def test_dataset_toml_image_dir_falls_back_to_the_working_directory(tmp_path, monkeypatch):
    """sd-scripts reads a relative `image_dir` from the working directory; lorakit looks beside the TOML first."""
    (tmp_path / "train" / "img").mkdir(parents=True)
    pattern(64, 64).save(tmp_path / "train" / "img" / "0.png")
    (tmp_path / "configs").mkdir()
    toml = tmp_path / "configs" / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'train/img'\n")
    monkeypatch.chdir(tmp_path)
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert [e.item.path for e in ds.examples] == [(tmp_path / "train" / "img" / "0.png").resolve()]


def test_dataset_toml_zero_repeats_skips_the_subset(tmp_path):
    one_image_folders(tmp_path, "a", "b")
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                    "[[datasets.subsets]]\nimage_dir = 'b'\nnum_repeats = 0\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert [e.item.path.parent.name for e in ds.examples] == ["a"] and len(ds) == 1
    assert any(p.endswith("b") and "never drawn" in r for p, r in ds.report.skipped)


def test_metadata_json_joins_caption_and_tags_and_refuses_bad_shapes(tmp_path):
    (tmp_path / "ft").mkdir()
    pattern(64, 64, 0).save(tmp_path / "ft" / "photo.001.png")
    pattern(64, 64, 1).save(tmp_path / "ft" / "b.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"photo.001": {"caption": "a dog", "tags": "grass, sunny"}, "b": {"tags": "cat"}}))
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'ft'\n"
                    "metadata_file = 'meta.json'\n")
    cfg = cfg_for(tmp_path, dataset_config=str(toml))
    ds = TrainDataset.from_config(cfg, native_resolution=64)
    assert sorted(e.item.caption for e in ds.examples) == ["a dog, grass, sunny", "cat"]  # sd-scripts' join
    # with another caption_separator the tags are joined by it (one shuffle unit each), with enable_wildcard after
    # every line of the caption, as sd-scripts does
    meta.write_text(json.dumps({"photo.001": {"caption": "a dog\na sks dog", "tags": "grass; sunny"}}))
    for extra, caption in [("", "a dog\na sks dog; grass; sunny"),
                           ("enable_wildcard = true\n", "a dog; grass; sunny\na sks dog; grass; sunny")]:
        toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'ft'\n"
                        f"metadata_file = 'meta.json'\ncaption_separator = ';'\n{extra}")
        ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
        assert [e.item.caption for e in ds.examples] == [caption]
    for bad, message in [([1, 2], "expected a JSON object"), ({"b": {"tags": ["cat"]}}, "entry 'b' must be")]:
        meta.write_text(json.dumps(bad))
        with pytest.raises(DatasetError, match=message):
            TrainDataset.from_config(cfg, native_resolution=64)


def test_caption_files_with_another_extension_are_reported(tmp_path):
    """sd-scripts' default caption extension is `.caption`; lorakit's `.txt`. A migrating user is told."""
    d = tmp_path / "train" / "5_sks dog"
    d.mkdir(parents=True)
    for i in range(2):
        pattern(64, 64, i).save(d / f"{i}.png")
        (d / f"{i}.caption").write_text("sks dog on grass")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train")), native_resolution=64)
    assert [n for p, n in ds.report.notes if p == str(d)] == [
        "2 .caption caption file(s) not read: `caption_extension` is '.txt' (set `caption_extension = \".caption\"` "
        "to use them)"]
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"),
                                          caption_extension=".caption"), native_resolution=64)
    assert {e.item.caption for e in ds.examples} == {"sks dog on grass"} and not ds.report.notes
    with pytest.raises(ConfigError, match="`caption_extension` must be a file extension starting with a dot"):
        cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"), caption_extension="caption")
    # a caption dataset (no class tokens to fall back on) where no image has a caption of that extension: refused,
    # not trained on empty captions
    flat = tmp_path / "styles"
    d.rename(flat)
    with pytest.raises(DatasetError, match=r"styles: no image has a .txt caption, but 2 have .caption captions: set "
                                           r"`caption_extension = \".caption\"` to use them"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(flat)), native_resolution=64)
    (flat / "0.txt").write_text("one of them captioned")  # a folder with captions of its extension trains
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(flat)), native_resolution=64)
    assert sorted(e.item.caption for e in ds.examples) == ["", "one of them captioned"]


def test_a_dreambooth_folder_given_directly_and_uncaptioned_reg_images_are_refused(tmp_path):
    """Both would train every image with an empty caption (sd-scripts reads only `<repeats>_<name>` sub-folders)."""
    d = tmp_path / "train" / "10_sks dog"
    d.mkdir(parents=True)
    pattern(64, 64).save(d / "0.png")
    with pytest.raises(DatasetError, match="is itself a `<repeats>_<identifier> <class>` folder: set `train_data_dir`"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d)), native_resolution=64)
    reg = tmp_path / "reg"
    reg.mkdir()
    pattern(64, 64, 1).save(reg / "r.png")
    with pytest.raises(DatasetError, match="`reg_data_dir` .* has images but no .txt captions"):
        TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(reg)),
                                 native_resolution=64)
    (reg / "r.txt").write_text("a dog")  # captioned reg images are fine
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(reg)),
                                  native_resolution=64)
    assert sorted(e.item.caption for e in ds.examples) == ["a dog"] + ["sks dog"]


def test_sd_scripts_caption_options():
    """prefix/suffix, the fixed part before `keep_tokens_separator`, tag dropout and the dropout epochs, as
    sd-scripts' process_caption applies them."""
    rng = random.Random(0)
    assert process_caption("dog, grass", prefix="sks", suffix="photo") == "sks dog, grass photo"
    assert process_caption("dog, grass", prefix="sks", drop=True, rng=rng) == ""
    caption = "sks, dog ||| grass, sunny, park, ball, tree, sky"
    seen = set()
    for _ in range(200):
        out = split_tags(process_caption(caption, shuffle=True, tag_dropout_rate=0.5, keep_tokens_separator="|||",
                                         rng=rng))
        assert out[:2] == ["sks", "dog"] and set(out[2:]) <= {"grass", "sunny", "park", "ball", "tree", "sky"}
        seen.add(len(out) - 2)
    assert min(seen) < 3 < max(seen)  # tags were dropped, by chance, about half of them
    assert process_caption(caption, keep_tokens_separator="|||") == "sks, dog, grass, sunny, park, ball, tree, sky"
    # a second marker: the tags after it stay at the end (and no marker reaches the text encoder)
    ends = "sks ||| red, small, round ||| best quality, sharp"
    for _ in range(20):
        out = split_tags(process_caption(ends, shuffle=True, keep_tokens_separator="|||", rng=rng))
        assert out[0] == "sks" and out[-2:] == ["best quality", "sharp"] and sorted(out[1:4]) == ["red", "round",
                                                                                                   "small"]
    assert process_caption(ends, keep_tokens_separator="|||") == "sks, red, small, round, best quality, sharp"
    # with the options off, the rng is used exactly as before (runs stay reproducible across versions)
    a, b = random.Random(1), random.Random(1)
    process_caption("a, b, c", shuffle=True, keep_tokens=1, rng=a)
    tags = ["b", "c"]
    b.shuffle(tags)
    assert a.random() == b.random()


def test_caption_dropout_every_n_epochs_and_prefix_reach_the_batches(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    pattern(64, 64).save(d / "0.png")
    (d / "0.txt").write_text("dog, grass")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d), caption_prefix="sks",
                                          caption_dropout_every_n_epochs=2), native_resolution=64)
    captions = [ds.load(ds.batches(epoch)[0], epoch, 0).captions[0] for epoch in range(4)]
    assert captions == ["sks dog, grass", "", "sks dog, grass", ""]


def test_metadata_file_subset_without_image_dir_reads_absolute_keys(tmp_path):
    """sd-scripts' fine-tuning metadata often keys images by absolute path, with no `image_dir`."""
    (tmp_path / "ft").mkdir()
    pattern(64, 64).save(tmp_path / "ft" / "a.png")
    (tmp_path / "meta.json").write_text(json.dumps({str(tmp_path / "ft" / "a.png"): {"caption": "a cat"}}))
    toml = tmp_path / "ds.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    assert [(e.item.path, e.item.caption) for e in ds.examples] == [(tmp_path / "ft" / "a.png", "a cat")]
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n")
    with pytest.raises(ConfigError, match="needs `image_dir` \\(or a `metadata_file`\\)"):
        TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)


def test_caption_separator_and_secondary_separator():
    """sd-scripts' caption_separator splits the tags (joined with ", " after shuffling); tags joined by the
    secondary_separator move and drop as one, and it becomes the caption_separator in what is trained on."""
    rng = random.Random(0)
    orders = set()
    for _ in range(50):
        out = process_caption("sks; red; small; round", shuffle=True, keep_tokens=1, rng=rng, separator=";")
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == ["red", "round", "small"]
        orders.add(out)
    assert len(orders) > 1
    dropped_pair = False
    for _ in range(50):
        out = process_caption("sks, red;;;round, small, blue", shuffle=True, keep_tokens=1, rng=rng,
                              tag_dropout_rate=0.3, secondary_separator=";;;")
        assert ";;;" not in out
        assert ("red" in out) == ("round" in out) == ("red,round" in out)  # together in place, or dropped together
        dropped_pair = dropped_pair or "red" not in out
    assert dropped_pair
    assert process_caption("sks, red;;;round", secondary_separator=";;;") == "sks, red,round"
    with pytest.raises(ConfigError, match="`caption_separator` must be a visible separator"):
        TrainConfig(caption_separator=" ")


def test_caption_separator_reaches_the_batches_from_a_dataset_toml(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    pattern(64, 64).save(d / "0.png")
    (d / "0.txt").write_text("sks|red|small|round|blue|green")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{d.as_posix()}'\n"
                    "caption_separator = '|'\nshuffle_caption = true\nkeep_tokens = 1\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, dataset_config=str(toml)), native_resolution=64)
    captions = {ds.load(ds.batches(epoch)[0], epoch, 0).captions[0] for epoch in range(6)}
    assert all(c.startswith("sks, ") and sorted(c.split(", ")[1:]) == ["blue", "green", "red", "round", "small"]
               for c in captions) and len(captions) > 1


def test_enable_wildcard_draws_a_line_and_a_choice(tmp_path):
    """sd-scripts' enable_wildcard: each line of a caption file is an alternative and `{a|b}` picks one (`{{` `}}`
    stay braces); the prefix goes on every line. Without it, only the first line is read (and the report says so)."""
    from lorakit.data.captions import expand_wildcards

    rng = random.Random(0)
    drawn = {expand_wildcards("a {red|blue} shape\nan {old|new} {{logo}}", rng) for _ in range(200)}
    assert drawn == {"a red shape", "a blue shape", "an old {logo}", "an new {logo}"}
    assert process_caption("{red|blue} dog\nblue cat", prefix="sks", wildcards=True) == "sks red dog"  # no rng
    # as in sd-scripts, the prefix and suffix are drawn from too
    assert {process_caption("a dog", prefix="{sks|ohwx}", suffix="{day|night}", wildcards=True, rng=rng)
            for _ in range(200)} == {"sks a dog day", "sks a dog night", "ohwx a dog day", "ohwx a dog night"}
    d = tmp_path / "imgs"
    d.mkdir()
    pattern(64, 64).save(d / "0.png")
    (d / "0.txt").write_text("a {red|blue} circle\na green square\n")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d), enable_wildcard=True, caption_prefix="sks"),
                                  native_resolution=64)
    captions = {ds.load(ds.batches(epoch)[0], epoch, 0).captions[0] for epoch in range(30)}
    assert captions == {"sks a red circle", "sks a blue circle", "sks a green square"}
    plain = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d)), native_resolution=64)
    assert plain.examples[0].item.caption == "a {red|blue} circle"
    assert "2 lines; only the first is used" in plain.report.format()


def test_resize_interpolation_chooses_the_filter_and_keys_the_latent_cache(tmp_path):
    from PIL import Image as PILImage

    from lorakit.data.dataset import prepare_pixels, resize_filter
    from lorakit.data.latents import cache_key

    assert resize_filter(None, (100, 100), (64, 64)) == ("lanczos", PILImage.Resampling.LANCZOS)
    assert resize_filter("area", (100, 100), (64, 64)) == ("area", PILImage.Resampling.BOX)
    assert resize_filter("area", (32, 32), (64, 64))[0] == "lanczos"  # averaging cannot enlarge
    assert cfg_for(tmp_path, resize_interpolation="cubic").resize_interpolation == "bicubic"  # sd-scripts' alias
    assert resize_filter("bicubic", (100, 100), (64, 64)) == ("bicubic", PILImage.Resampling.BICUBIC)
    d = tmp_path / "data" / "1_sks toy"
    d.mkdir(parents=True)
    pattern(96, 96).save(d / "a.png")
    pixels = {}
    for name in (None, "nearest", "area"):
        ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(d.parent), resize_interpolation=name,
                                              cache_latents=False), native_resolution=64)
        pixels[name] = prepare_pixels(ds.examples[0])
    expected = torch.from_numpy(np.asarray(pattern(96, 96).resize((64, 64), PILImage.Resampling.NEAREST),
                                           dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pixels["nearest"], expected)
    assert not torch.equal(pixels[None], pixels["nearest"]) and not torch.equal(pixels[None], pixels["area"])
    key = cache_key("sha", (64, 64), (64, 64), (0, 0, 64, 64), "vae")
    assert "resize" not in key and cache_key("sha", (64, 64), (64, 64), (0, 0, 64, 64), "vae", "area") != key
    with pytest.raises(ConfigError, match="resize_interpolation"):
        cfg_for(tmp_path, train_data_dir=str(d.parent), resize_interpolation="sinc")


def test_bad_datasets_are_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    """A Hub model is a download of gigabytes: the dataset is read and checked first, so its errors come at once."""
    import lorakit
    import lorakit.models

    def no_download(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(lorakit.models, "load_models", no_download)
    (tmp_path / "empty").mkdir()
    masks = tmp_path / "data" / "1_sks dog"
    masks.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(masks / "a.png")
    for options, error, match in [
        (dict(train_data_dir=str(tmp_path / "missing")), DatasetError, "does not exist"),
        (dict(train_data_dir=str(tmp_path / "empty")), DatasetError, "has no images"),
        (dict(train_data_dir=str(tmp_path / "data"), masked_loss=True,
              conditioning_data_dir=str(tmp_path / "no_masks")), (ConfigError, DatasetError), "no_masks"),
        (dict(train_data_dir=str(tmp_path / "data"), resolution="2048", enable_bucket=True), ConfigError,
         "must lie between `min_bucket_reso`"),
    ]:
        with pytest.raises(error, match=match):
            lorakit.train(pretrained_model_name_or_path="someone/sd-model", output_dir=str(tmp_path / "out"),
                          max_train_steps=1, **options)


def test_color_aug_changes_a_third_of_the_images_by_hue_or_gamma_as_sd_scripts():
    """sd-scripts' colour jitter: p = 0.33, then a hue shift within ±8/180 of a turn or a gamma in [0.95, 1.05],
    half each; the gamma applies to [0, 1] values and the hue shift turns the colour wheel."""
    from lorakit.data.color import ColorJitter, apply_color_jitter, draw_color_jitter

    draws = [draw_color_jitter(random.Random(i)) for i in range(3000)]
    changed = [d for d in draws if d is not None]
    hues = [d.hue for d in changed if d.hue]
    gammas = [d.gamma for d in changed if d.gamma != 1.0]
    assert 0.30 < len(changed) / len(draws) < 0.36 and len(hues) + len(gammas) == len(changed)
    assert 0.4 < len(hues) / len(changed) < 0.6
    assert all(abs(h) <= 8 / 180 for h in hues) and all(0.95 <= g <= 1.05 for g in gammas)
    assert min(hues) < -7 / 180 and max(hues) > 7 / 180 and min(gammas) < 0.955 and max(gammas) > 1.045

    gray = Image.new("RGB", (4, 4), (128, 128, 128))
    out = np.asarray(apply_color_jitter(gray, ColorJitter(gamma=1.05)))
    assert (out == round(255 * (128 / 255) ** 1.05)).all()  # 124: on [0, 1] values, not 128 ** 1.05 = 163
    white = np.asarray(apply_color_jitter(Image.new("RGB", (4, 4), (255, 255, 255)), ColorJitter(gamma=0.95)))
    assert (white == 255).all()
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    turned = np.asarray(apply_color_jitter(red, ColorJitter(hue=8 / 180)))[0, 0]
    assert turned[0] > 240 and 50 < turned[1] < 90 and turned[2] < 5  # red, 16° towards yellow
    back = np.asarray(apply_color_jitter(red, ColorJitter(hue=-8 / 180)))[0, 0]
    assert back[0] > 240 and back[1] < 5 and 50 < back[2] < 90  # towards magenta


def test_an_image_over_pillows_warning_size_trains_and_one_over_its_limit_is_skipped(monkeypatch, tmp_path):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that (a decompression bomb): a large photo in
    between is read (as `prepare check` reports it, `huge`); a bomb is refused by name."""
    from lorakit.data.images import ImageProblem

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (80, 80), "red").save(tmp_path / "large.png")  # 6,400 pixels: between the two
    Image.new("RGB", (100, 100), "red").save(tmp_path / "bomb.png")  # 10,000 > 8,192
    assert load_rgb(tmp_path / "large.png").size == (80, 80)
    with pytest.raises(ImageProblem, match="too large .over 8192 pixels"):
        load_rgb(tmp_path / "bomb.png")


def test_a_folder_of_photos_without_any_caption_is_called_out(tmp_path, capsys):
    """The commonest mistake: `train_data_dir` pointing at a plain folder of photos. It trains (on purpose, a
    caption-free LoRA is possible) but says, before training, that the LoRA will have no trigger word."""
    flat = tmp_path / "photos"
    flat.mkdir()
    for i in range(3):
        pattern(64, 64, i).save(flat / f"IMG_{i}.png")
    ds = TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(flat)), native_resolution=64)
    assert len(ds.examples) == 3
    out = capsys.readouterr().out
    assert "⚠ none of the 3 training images has a caption" in out and "10_sks dog" in out and ".txt" in out
    assert any("has no trigger word" in note for _, note in ds.report.notes)
    (flat / "IMG_0.txt").write_text("a photo of sks")  # one caption is enough to be a deliberate caption set
    TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(flat)), native_resolution=64)
    assert "none of the" not in capsys.readouterr().out
    db = tmp_path / "db" / "10_sks dog"  # folder tokens are captions
    db.mkdir(parents=True)
    pattern(64, 64, 0).save(db / "a.png")
    TrainDataset.from_config(cfg_for(tmp_path, train_data_dir=str(tmp_path / "db")), native_resolution=64)
    assert "none of the" not in capsys.readouterr().out
