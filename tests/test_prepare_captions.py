"""Caption bulk edits: pure tag edits, folder edits into a new folder or in place, frequencies, auto-captioning."""

from __future__ import annotations

import hashlib

import pytest

from lorakit.dataprep import (
    add_trigger,
    auto_caption,
    dedupe_tags,
    edit_caption,
    prepare,
    remove_tags,
    replace_tags,
    tag_frequencies,
)
from lorakit.dataprep.captions import deduped, parse_mapping, with_replaced, with_trigger, without
from lorakit.dataprep.samples import drawn_image, encode
from lorakit.errors import ConfigError, DatasetError, ModelLoadError

CAPTIONS = {
    "a.png": "1girl, red hair, smiling",
    "b.png": "Red_Hair, 1girl, red hair, outdoors",
    "c.png": "sks, portrait,\nsmiling",
    "d.png": None,  # no caption file
}


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        (folder / name).write_bytes(encode(drawn_image(i, (48, 48)), "PNG"))
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    (folder / "notes.md").write_text("keep me")
    return folder


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def read(folder, name):
    return (folder / name).read_text().strip()


def test_pure_tag_edits():
    assert with_trigger("a, sks, b", "sks") == "sks, a, b"
    assert with_trigger(with_trigger("a, b", "sks"), "sks") == "sks, a, b"  # idempotent
    assert with_trigger("", "sks") == "sks"
    assert with_replaced("red_hair, Red Hair , blue eyes", {"red hair": "green hair"}) == "green hair, green hair, " \
                                                                                          "blue eyes"
    assert with_replaced("a, b, c", {"b": ""}) == "a, c"
    assert without("a, b,  B , c", ["b"]) == "a, c"
    assert deduped("a, b, A, b_c, b c") == "a, b, b_c"
    assert edit_caption("x, y, x, z", trigger="t", replace={"y": "w"}, remove=["z"], dedupe=True) == "t, x, w"
    assert parse_mapping(["red=blue", "bad="]) == {"red": "blue", "bad": ""}
    with pytest.raises(ValueError, match="old tag=new tag"):
        parse_mapping(["nonsense"])


def test_add_trigger_into_a_new_folder(dataset, tmp_path):
    before = hashes(dataset)
    out = tmp_path / "captioned"
    result = add_trigger(dataset, "zqx", output_dir=out)
    assert hashes(dataset) == before  # originals untouched
    assert read(out, "a.txt") == "zqx, 1girl, red hair, smiling"
    assert read(out, "c.txt") == "zqx, sks, portrait, smiling"
    assert read(out, "d.txt") == "zqx"
    assert sorted(result.changed) == ["a.txt", "b.txt", "c.txt"] and result.created == ["d.txt"]
    for name in ("a.png", "b.png", "c.png", "d.png", "notes.md"):  # the rest of the dataset travels along
        assert (out / name).read_bytes() == (dataset / name).read_bytes()


def test_replace_remove_dedupe_in_place(dataset):
    replace_tags(dataset, {"red hair": "auburn hair"}, in_place=True)
    assert read(dataset, "a.txt") == "1girl, auburn hair, smiling"
    assert read(dataset, "b.txt") == "auburn hair, 1girl, auburn hair, outdoors"
    dedupe_tags(dataset, in_place=True)
    assert read(dataset, "b.txt") == "auburn hair, 1girl, outdoors"
    result = remove_tags(dataset, ["1girl"], in_place=True)
    assert read(dataset, "a.txt") == "auburn hair, smiling"
    assert not (dataset / "d.txt").exists()  # no trigger: missing captions are not invented
    assert "c.txt" not in result.changed and result.unchanged == 2


def test_edits_refuse_to_touch_originals_unless_asked(dataset):
    before = hashes(dataset)
    with pytest.raises(DatasetError, match="output_dir"):
        add_trigger(dataset, "zqx")
    with pytest.raises(DatasetError, match="outside"):
        add_trigger(dataset, "zqx", output_dir=dataset / "sub")
    with pytest.raises(ValueError, match="trigger"):
        add_trigger(dataset, "  ", output_dir=dataset.parent / "x")
    assert hashes(dataset) == before


def test_tag_frequencies(dataset):
    freq = tag_frequencies(dataset)
    assert freq["1girl"] == 2
    assert freq["red hair"] == 2  # `Red_Hair` and `red hair` in b.txt count once, spelled as first seen
    assert freq["smiling"] == 2
    assert freq.most_common(1)[0][1] == 2
    assert sum(freq.values()) == 3 + 3 + 3


def test_auto_caption_with_a_captioner(dataset, tmp_path):
    seen = []

    def captioner(image):
        seen.append(image.size)
        return "a colourful drawing"

    out = tmp_path / "auto"
    result = auto_caption(dataset, output_dir=out, captioner=captioner, trigger="zqx", progress=False)
    assert seen == [(48, 48)]  # only the uncaptioned image
    assert read(out, "d.txt") == "zqx, a colourful drawing"
    assert read(out, "a.txt") == CAPTIONS["a.png"]
    assert result.created == ["d.txt"]
    out2 = tmp_path / "auto2"
    auto_caption(dataset, output_dir=out2, captioner=lambda im: "x", overwrite=True, progress=False)
    assert all(read(out2, f"{n}.txt") == "x" for n in "abcd")


def test_prepare_auto_caption_with_a_trigger_puts_it_in_kept_captions_too(tmp_path, monkeypatch):
    """`--auto_caption --trigger sks`: new captions and the ones kept (not overwritten) all start with the trigger,
    once."""
    import lorakit
    import lorakit.dataprep.autocaption as autocaption

    monkeypatch.setattr(autocaption, "blip_captioner", lambda *a, **k: (lambda image: "a photo of a dog"))
    src = tmp_path / "photos"
    src.mkdir()
    for i, name in enumerate("ab"):
        (src / f"{name}.png").write_bytes(encode(drawn_image(i, (64, 64)), "PNG"))
    (src / "a.txt").write_text("my own caption, red dress")
    out = tmp_path / "out"
    lorakit.prepare(action="captions", input_dir=str(src), output_dir=str(out), auto_caption=True, trigger="sks")
    assert (out / "a.txt").read_text().strip() == "sks, my own caption, red dress"
    assert (out / "b.txt").read_text().strip() == "sks, a photo of a dog"


def test_auto_caption_offline_says_so(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline"):
        auto_caption(dataset, output_dir=tmp_path / "auto", model="lorakit-test/not-cached-captioner")


def test_prepare_captions_action(dataset, tmp_path, capsys):
    out = tmp_path / "edited"
    prepare(action="captions", input_dir=str(dataset), output_dir=str(out), trigger="zqx",
            replace_tags=["smiling=happy"], dedupe_tags=True)
    assert read(out, "a.txt") == "zqx, 1girl, red hair, happy"
    assert "most common tags: zqx (4)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs an edit"):
        prepare(action="captions", input_dir=str(dataset), output_dir=str(tmp_path / "e2"))
    with pytest.raises(ConfigError, match="--output_dir"):
        prepare(action="captions", input_dir=str(dataset), trigger="zqx")


def test_auto_caption_with_a_local_blip_model(dataset, tmp_path):
    """The real transformers BLIP path, on a tiny random BLIP saved as a local folder (offline)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    model_dir = tmp_path / "tiny-blip"
    model_dir.mkdir()
    words = ["drawing", "of", "red", "square", "blue", "circle"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "[DEC]"]
    (model_dir / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(str(model_dir / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(model_dir)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=len(vocab) - 1,
                                         pad_token_id=0, sep_token_id=3, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32)
    torch.manual_seed(0)  # a fixed random model: it writes the same words every run
    BlipForConditionalGeneration(config).save_pretrained(model_dir)

    out = tmp_path / "auto"
    result = auto_caption(dataset, output_dir=out, model=str(model_dir), trigger="zqx", device="cpu", progress=False)
    assert result.created == ["d.txt"]
    caption = read(out, "d.txt")
    assert caption.startswith("zqx")
    generated = [w for tag in caption.split(",")[1:] for w in tag.split()]
    assert generated and set(generated) <= set(words)


def test_a_shared_caption_is_edited_once_and_tag_lists_add_up(tmp_path, capsys):
    """`a.png` and `a.jpg` share `a.txt`: `cat=dog, dog=wolf` must give "dog", not "wolf" (edited twice). Repeated
    `--remove_tags` flags add up, an entry may list several tags, and a multi-tag trigger is added once."""
    from lorakit.cli import main

    d = tmp_path / "pair"
    d.mkdir()
    (d / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    (d / "a.jpg").write_bytes(encode(drawn_image(1, (64, 64)), "JPEG"))
    (d / "a.txt").write_text("cat, red, long hair, blue eyes, smile\n")
    assert main(["prepare", "captions", str(d), "--in_place", "--replace_tags", "cat=dog", "dog=wolf"]) == 0
    assert read(d, "a.txt") == "dog, red, long hair, blue eyes, smile"
    assert main(["prepare", "captions", str(d), "--in_place", "--remove_tags", "long hair", "--remove_tags",
                 "blue eyes, smile"]) == 0
    assert read(d, "a.txt") == "dog, red"
    for _ in range(2):
        assert main(["prepare", "captions", str(d), "--in_place", "--trigger", "sks, style"]) == 0
    assert read(d, "a.txt") == "sks, style, dog, red"
