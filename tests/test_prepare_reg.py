"""Regularisation images on the tiny model: the requested count, in the reg layout, resumable after a crash."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.data.folders import LoadReport, scan_subset, subsets_from_folder
from lorakit.dataprep import generate_reg_images, prepare
from lorakit.dataprep.samples import drawn_image, encode
from lorakit.errors import ConfigError

FAST = dict(num_inference_steps=2, width=32, height=32, progress=False, seed=7)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    from lorakit.tiny import build_tiny

    return build_tiny("sd1", seed=0)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def test_resumes_after_interruption_with_the_same_images(tiny, tmp_path):
    def stop_after_two(index, path):
        if len(list(path.parent.glob("*.png"))) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_reg_images(tiny, "a photo of a dog", 3, tmp_path / "reg", class_name="dog", on_image=stop_after_two,
                            **FAST)
    folder = tmp_path / "reg" / "1_dog"
    first = sorted(folder.glob("*.png"))
    assert [p.name for p in first] == ["reg_00000.png", "reg_00001.png"]
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no half files
    kept = {p.name: p.read_bytes() for p in first}

    result = generate_reg_images(tiny, "a photo of a dog", 3, tmp_path / "reg", class_name="dog", **FAST)
    assert result.existing == 2 and [p.name for p in result.written] == ["reg_00002.png"]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"reg_0000{i}.png" for i in range(3)]
    assert {n: (folder / n).read_bytes() for n in kept} == kept  # earlier images untouched
    assert all((folder / f"reg_0000{i}.txt").read_text() == "a photo of a dog\n" for i in range(3))

    # an uninterrupted run (in batches of 2) makes the same images: image i always comes from seed + i
    straight = generate_reg_images(tiny, "a photo of a dog", 3, tmp_path / "straight", class_name="dog",
                                   batch_size=2, **FAST)
    assert len(straight.written) == 3
    for i in range(3):
        a, b = pixels(folder / f"reg_0000{i}.png"), pixels(straight.folder / f"reg_0000{i}.png")
        assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 2
    assert np.abs(pixels(folder / "reg_00000.png") - pixels(folder / "reg_00001.png")).mean() > 1  # seeds differ

    again = generate_reg_images(tiny, "a photo of a dog", 3, tmp_path / "reg", class_name="dog", **FAST)
    assert again.written == [] and again.existing == 3


def test_counts_images_already_there_and_is_read_as_reg_data(tiny, tmp_path):
    folder = tmp_path / "reg" / "2_dog"
    folder.mkdir(parents=True)
    (folder / "my_own_dog.png").write_bytes(encode(drawn_image(0, (32, 32)), "PNG"))
    result = generate_reg_images(tiny, "a photo of a dog", 3, tmp_path / "reg", class_name="dog", repeats=2, **FAST)
    assert result.existing == 1 and len(result.written) == 2
    assert "3/3 class images" in result.summary()

    report = LoadReport()
    subsets = subsets_from_folder(tmp_path / "reg", is_reg=True, caption_extension=".txt", report=report)
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [(2, "dog", True)]
    items = scan_subset(subsets[0], report)
    assert sorted(it.caption for it in items) == ["a photo of a dog", "a photo of a dog", "dog"]
    assert report.skipped == []


def test_prepare_reg_action_loads_the_model(tiny_sd1_dir, tmp_path, capsys):
    result = prepare(action="reg", pretrained_model_name_or_path=str(tiny_sd1_dir), class_prompt="a photo of a cat",
                     num_images=2, output_dir=str(tmp_path), num_inference_steps=1, generation_batch_size=2,
                     device="cpu")
    assert result.folder == tmp_path / "1_a photo of a cat"
    assert len(list(result.folder.glob("*.png"))) == 2
    with Image.open(result.written[0]) as im:
        assert im.size == (64, 64)  # the tiny model's native resolution
    assert "2/2 class images" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="`class_prompt` is required"):
        prepare(action="reg", pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="class_prompt"):
        generate_reg_images("unused", " ", 1, tmp_path)


def test_a_folder_drawn_with_other_settings_is_not_continued(tiny, tmp_path):
    """The images of one folder are one set: continuing with another prompt or seed is refused, naming the change;
    the same settings continue."""
    from lorakit.errors import ConfigError

    generate_reg_images(tiny, "a photo of a dog", 1, tmp_path / "reg", class_name="dog", **FAST)
    with pytest.raises(ConfigError, match=r"holds 1 class images drawn with other settings \(seed 7 → 5\)"):
        generate_reg_images(tiny, "a photo of a dog", 2, tmp_path / "reg", class_name="dog", **{**FAST, "seed": 5})
    with pytest.raises(ConfigError, match="class_prompt 'a photo of a dog' → 'a dog'"):
        generate_reg_images(tiny, "a dog", 2, tmp_path / "reg", class_name="dog", **FAST)
    assert len(generate_reg_images(tiny, "a photo of a dog", 2, tmp_path / "reg", class_name="dog",
                                   **FAST).written) == 1
