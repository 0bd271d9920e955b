"""The toy world, its classifier and the bundled data examples (no diffusion model needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorakit.toy import world

ROOT = Path(__file__).resolve().parents[1]
DATA_EXAMPLES = ROOT / "data_examples"


def test_same_seed_same_world_other_seed_other_world():
    a = world.render(world.sample_scenes(16, 3))
    b = world.render(world.sample_scenes(16, 3))
    c = world.render(world.sample_scenes(16, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (16, 3, world.SIZE, world.SIZE) and a.min() >= 0 and a.max() <= 1


def test_pretraining_world_excludes_the_held_out_concepts():
    scenes = world.sample_scenes(2000, 0)
    described = [scenes.describe(i) for i in range(len(scenes))]
    assert {d["shape"] for d in described} == set(world.HELD_IN_SHAPES)
    assert {d["fill"] for d in described} == set(world.HELD_IN_FILLS)
    captions = world.random_captions(scenes, 0)
    assert not any(word in c.split() for c in captions for word in (*world.HELD_OUT_SHAPES, *world.HELD_OUT_FILLS))
    # the full world does contain them (the VAE and the classifier learn from it)
    everything = world.sample_scenes(2000, 0, shapes=world.SHAPES, fills=world.FILLS)
    assert {everything.describe(i)["shape"] for i in range(2000)} == set(world.SHAPES)


def test_captions_name_what_is_drawn():
    scenes = world.sample_scenes(4, 1, shapes=["crescent"], colours=["orange"], fills=["striped"],
                                 backgrounds=["black"])
    assert world.caption(scenes, 0) == "an orange striped crescent on a black background"
    assert world.caption(scenes, 0, style="class") == "an orange striped shape on a black background"
    assert world.caption(scenes, 0, style="short") == "an orange striped crescent"
    styles = {c.split()[-1] == "background" for c in world.random_captions(world.sample_scenes(200, 2), 2)}
    assert styles == {True, False}  # both long and short phrasings occur


def test_shapes_and_fills_draw_differently():
    n = len(world.SHAPES)
    base = dict(colour=torch.zeros(n, dtype=torch.long), background=torch.zeros(n, dtype=torch.long),
                cx=torch.full((n,), 16.0), cy=torch.full((n,), 16.0), radius=torch.full((n,), 10.0))
    solid = world.render(world.Scenes(shape=torch.arange(n), fill=torch.zeros(n, dtype=torch.long), **base))
    masks = (solid - solid[:, :, :1, :1]).abs().sum(1) > 0.5  # pixels that differ from the background
    for i in range(n):
        for j in range(i + 1, n):
            assert (masks[i] ^ masks[j]).sum() > 15, (world.SHAPES[i], world.SHAPES[j])
    striped = world.render(world.Scenes(shape=torch.arange(n), fill=torch.full((n,), 2), **base))
    inside = masks[0]
    # stripes: inside the circle, roughly half the pixels are the dark shade
    dark = (striped[0].sum(0) < solid[0].sum(0) - 0.3) & inside
    assert 0.3 < dark.sum() / inside.sum() < 0.7


def test_unknown_concept_is_named():
    with pytest.raises(ValueError, match="hexagon"):
        world.sample_scenes(2, 0, shapes=["hexagon"])


def test_tokenizer_knows_the_world_words(tmp_path):
    """Every caption word round-trips; shape words and the trigger are single tokens. (Whole-word merges can
    collide — "tr" from "triangle" splits "striped" — so a few words take several tokens, like rare words in SD.)"""
    from transformers import CLIPTokenizer

    from lorakit.tiny import write_clip_tokenizer

    write_clip_tokenizer(tmp_path, world.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    for word in world.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert tok.decode(ids).strip() == word
    for word in (*world.SHAPES, *world.BACKGROUNDS, "sks", world.CLASS_WORD):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_classifier_recognises_the_whole_world():
    from lorakit.toy.classifier import accuracy, load_classifier

    acc = accuracy(load_classifier(), n=600, seed=777)
    assert min(acc.values()) >= 0.97, acc


def test_classifier_rejects_wrong_labels():
    """Non-vacuous: a crescent is not called a circle, stripes are not called solid."""
    from lorakit.toy.classifier import load_classifier

    scenes = world.sample_scenes(64, 5, shapes=["crescent"], fills=["striped"])
    pred = load_classifier().predict(world.render(scenes))
    assert sum(p == "crescent" for p in pred["shape"]) >= 60
    assert sum(p == "striped" for p in pred["fill"]) >= 60


def test_data_examples_are_what_the_script_makes(tmp_path):
    from lorakit.toy.examples import make_data_examples

    made = tmp_path / "data_examples"
    make_data_examples(made)
    expected = sorted(p.relative_to(made).as_posix() for p in made.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DATA_EXAMPLES).as_posix() for p in DATA_EXAMPLES.rglob("*") if p.is_file())
    assert expected == shipped
    for rel in expected:
        assert (made / rel).read_bytes() == (DATA_EXAMPLES / rel).read_bytes(), rel
    total = sum(p.stat().st_size for p in DATA_EXAMPLES.rglob("*") if p.is_file())
    assert total <= 5 * 2 ** 20


def test_data_examples_replace_the_former_folder_names(tmp_path):
    """A data_examples/ written by an earlier version (`10_sks shape`, `1_shape`) is brought up to date: the former
    folders, holding only the same images, go; one with a file of the user's in it stays."""
    from lorakit.toy.examples import make_data_examples

    dest = tmp_path / "data_examples"
    make_data_examples(dest)
    img, reg = dest / "dreambooth" / "img", dest / "dreambooth" / "reg"
    shutil.copytree(img / "10_a sks shape", img / "10_sks shape")
    shutil.copytree(reg / "1_a shape", reg / "1_shape")
    (reg / "1_shape" / "mine.png").write_bytes(b"not an example")
    make_data_examples(dest)
    assert sorted(p.name for p in img.iterdir()) == ["10_a sks shape"]
    assert sorted(p.name for p in reg.iterdir()) == ["1_a shape", "1_shape"]
    assert (reg / "1_shape" / "mine.png").read_bytes() == b"not an example"


def test_data_examples_configs_are_valid_and_show_the_concepts():
    from lorakit.config import TrainConfig
    from lorakit.toy.classifier import load_classifier

    for name in ("dreambooth", "captions"):
        cfg = TrainConfig.from_toml(DATA_EXAMPLES / f"{name}.toml")
        assert cfg.pretrained_model_name_or_path == "lorakit-toy"
        assert (ROOT / cfg.train_data_dir).is_dir()
    classifier = load_classifier()
    crescents = sorted((DATA_EXAMPLES / "dreambooth" / "img").glob("*_a sks shape/*.png"))
    reg = sorted((DATA_EXAMPLES / "dreambooth" / "reg").glob("*_a shape/*.png"))
    striped = sorted((DATA_EXAMPLES / "captions").glob("[0-9]*.png"))
    solid = sorted((DATA_EXAMPLES / "captions").glob("solid_*.png"))
    assert crescents and reg and striped and solid

    def predict(paths):
        from PIL import Image

        return classifier.predict(torch.stack([world.from_pil(Image.open(p)) for p in paths]))

    assert set(predict(crescents)["shape"]) == {"crescent"}
    assert "crescent" not in predict(reg)["shape"]
    assert set(predict(striped)["fill"]) == {"striped"}
    assert set(predict(solid)["fill"]) == {"solid"}
    for p in striped:
        assert "striped" in p.with_suffix(".txt").read_text()
    for p in solid:  # the contrast: what the word "striped" adds
        assert "striped" not in p.with_suffix(".txt").read_text()
