"""`prepare repair`: a clean copy in a new folder — fixed pixels, carried captions, untouched originals."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from lorakit.data.folders import LoadReport, scan_subset, subsets_from_folder
from lorakit.dataprep import check_dataset, repair_dataset
from lorakit.dataprep.repair import ascii_name
from lorakit.dataprep.samples import drawn_image, encode, write_problem_dataset
from lorakit.errors import DatasetError

FULL = dict(resolution=64, background="#00ff00", max_side=512, duplicates="drop", near_duplicates="move",
            too_small="move", ascii_names=True, default_caption="a drawing")
# what repair cannot decide for the user: grey pictures, 1:4 strips and over-long captions stay (and are reported)
JUDGEMENT_CALLS = {"grayscale": ["deep_grey16.png", "grey.png"], "extreme_aspect": ["long_strip.png"],
                   "caption_too_long": ["long_caption.png"]}


def tree_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def loader_report(folder) -> LoadReport:
    """What the trainer's dataset loader says about a folder (notes = things it had to fix, skipped = unusable)."""
    report = LoadReport()
    for subset in subsets_from_folder(folder, is_reg=False, caption_extension=".txt", report=report):
        scan_subset(subset, report)
    return report


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    src = root / "photos"
    expected = write_problem_dataset(src)
    before = tree_hashes(src)
    result = repair_dataset(src, root / "clean", **FULL)
    return root, src, expected, before, result


def test_originals_are_byte_identical(repaired):
    root, src, _, before, _ = repaired
    assert tree_hashes(src) == before


def test_recheck_is_clean_but_for_judgement_calls(repaired):
    root, _, _, _, result = repaired
    after = {k: sorted(p.path for p in v) for k, v in result.after.problems.items()}
    assert after == JUDGEMENT_CALLS
    assert after == {k: sorted(p.path for p in v)
                     for k, v in check_dataset(root / "clean", 64).problems.items()}
    assert {k for k in result.before.problems} - set(JUDGEMENT_CALLS) >= {
        "cmyk", "high_bit_depth", "alpha", "palette", "exif_rotated", "huge", "duplicate", "missing_caption"}


def test_recheck_has_no_problem_at_all_without_judgement_calls(tmp_path):
    src = tmp_path / "photos"
    write_problem_dataset(src)
    for names in JUDGEMENT_CALLS.values():
        for name in names:
            (src / name).unlink()
    result = repair_dataset(src, tmp_path / "clean", **FULL)
    assert result.after.problems == {}
    assert result.after.ok


def test_actions(repaired):
    root, src, _, _, result = repaired
    by_source = {a.source: a for a in result.actions}
    for name in ("corrupt.jpg", "empty.png", "truncated.jpg", "good_0_copy.png"):
        assert by_source[name].action == "dropped"
    for name, kind in (("similar_to_good_1.jpg", "near_duplicate"), ("tiny.png", "too_small")):
        moved = root / "clean_set_aside" / kind / name
        assert by_source[name].action == "moved"
        assert moved.read_bytes() == (src / name).read_bytes()
        assert moved.with_suffix(".txt").is_file()
    assert by_source["good_1.png"].action == "copied"
    assert (root / "clean" / "good_1.png").read_bytes() == (src / "good_1.png").read_bytes()
    assert by_source["png_named.jpg"].output == "png_named.png"
    assert by_source["png_named.jpg"].action == "copied"  # right extension, same bytes
    assert (root / "clean" / "png_named.png").read_bytes() == (src / "png_named.jpg").read_bytes()
    assert by_source["café_日本.png"].output == "cafe_.png"
    assert not (root / "clean" / "notes.pdf").exists() and not (root / "clean" / "ghost.txt").exists()
    assert "dropped" in result.summary() and "| corrupt.jpg | dropped |" in result.to_markdown()


def test_pixels_are_fixed(repaired):
    root, src, _, _, _ = repaired
    out = root / "clean"
    with Image.open(out / "transparent.png") as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (0, 255, 0)  # transparent corner → background
    with Image.open(src / "rotated.jpg") as raw, Image.open(out / "rotated.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"), dtype=np.int16)
        assert im.size == (96, 72) and not im.getexif().get(0x0112)
        assert np.abs(np.asarray(im, dtype=np.int16) - upright).mean() < 4
    with Image.open(out / "deep_grey16.png") as im:  # 16-bit scaled, not clipped to white
        grey = np.asarray(drawn_image(12, (96, 96)).convert("L"), dtype=np.float64)
        assert im.mode == "RGB" and abs(np.asarray(im.convert("L"), dtype=np.float64).mean() - grey.mean()) < 1
    with Image.open(out / "deep_rgb48.png") as im:
        ref = np.asarray(drawn_image(13, (96, 96)), dtype=np.int16)
        assert np.abs(np.asarray(im, dtype=np.int16) - ref).max() <= 1
    for name in ("cmyk.jpg", "palette.png"):
        with Image.open(out / name) as im:
            assert im.mode == "RGB"
    with Image.open(out / "huge.jpg") as im:
        assert max(im.size) == 512 and abs(im.width / im.height - 2200 / 1400) < 0.01


def test_captions_are_carried_and_fixed(repaired):
    root, *_ = repaired
    out = root / "clean"
    assert (out / "good_1.txt").read_text() == "a drawing, good 1\n"
    assert (out / "latin1_caption.txt").read_text(encoding="utf-8") == "café au lait\n"
    assert (out / "two_lines.txt").read_text() == "a drawing, second line\n"
    assert (out / "no_caption.txt").read_text() == "a drawing\n"
    assert (out / "blank_caption.txt").read_text() == "a drawing\n"
    assert (out / "cafe_.txt").read_text() == "a drawing, unicode\n"


def test_trainer_loader_accepts_the_output_without_notes(repaired):
    root, src, *_ = repaired
    original = loader_report(src)
    assert original.notes and original.skipped  # non-vacuous: the loader does complain about the originals
    clean = loader_report(root / "clean")
    assert clean.notes == [] and clean.skipped == []
    assert clean.used == {str(root / "clean"): 21}


@pytest.mark.slow
def test_repaired_output_trains_without_dataset_warnings(tmp_path, tiny_sd1_dir):
    from lorakit import train

    src = tmp_path / "photos"
    write_problem_dataset(src)
    keep = ("cmyk", "deep_", "transparent", "palette", "rotated", "huge", "corrupt", "empty", "truncated")
    for p in src.iterdir():
        if not p.name.startswith(keep):
            p.unlink()
    repair_dataset(src, tmp_path / "clean", resolution=64, max_side=128, default_caption="a drawing")
    result = train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "clean"),
                   output_dir=str(tmp_path / "run"), resolution="64", max_train_steps=2, network_dim=4,
                   sample_at_end=False)
    assert result.steps == 2
    report = json.loads((tmp_path / "run" / "dataset_report.json").read_text())
    assert report["notes"] == [] and report["skipped"] == []
    assert report["used"] == {str(tmp_path / "clean"): 7}


def test_repair_from_a_zip(tmp_path):
    src = tmp_path / "photos"
    write_problem_dataset(src)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(src.iterdir()):
            z.write(f, f.name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = repair_dataset(archive, tmp_path / "clean", **FULL)
    assert {k: sorted(p.path for p in v) for k, v in result.after.problems.items()} == JUDGEMENT_CALLS
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest


def test_refuses_to_write_into_the_originals(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    for dst in (src, src / "clean"):
        with pytest.raises(DatasetError, match="outside the input"):
            repair_dataset(src, dst)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        repair_dataset(src, tmp_path / "used")
    with pytest.raises(ValueError, match="`duplicates` must be one of keep, drop, move"):
        repair_dataset(src, tmp_path / "new", duplicates="delete")
    with pytest.raises(ValueError, match="`background`"):
        repair_dataset(src, tmp_path / "new", background="not-a-colour")
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(DatasetError, match="holds no image files to repair"):
        repair_dataset(tmp_path / "empty", tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


def test_default_caption_leaves_dreambooth_folder_tokens_alone(tmp_path):
    src = tmp_path / "train"
    (src / "10_sks dog").mkdir(parents=True)
    (src / "10_sks dog" / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    (src / "loose").mkdir()
    (src / "loose" / "b.png").write_bytes(encode(drawn_image(1, (64, 64)), "PNG"))
    repair_dataset(src, tmp_path / "clean", resolution=64, default_caption="sks")
    assert (tmp_path / "clean" / "10_sks dog" / "a.png").is_file()
    assert not (tmp_path / "clean" / "10_sks dog" / "a.txt").exists()  # the folder name stays its caption
    assert (tmp_path / "clean" / "loose" / "b.txt").read_text() == "sks\n"


def test_name_collisions_get_suffixes(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    (src / "a.jpg").write_bytes(encode(drawn_image(1, (64, 64)), "PNG"))  # PNG data: becomes a.png too
    result = repair_dataset(src, tmp_path / "clean", resolution=64)
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["a.png", "a_2.png"]
    assert len([a for a in result.actions if a.output]) == 2
    assert ascii_name("日本.png") == "_.png" and ascii_name("Ünïcödé name.jpg") == "Unicode name.jpg"


def test_zip_members_cannot_escape_the_output(tmp_path):
    archive = tmp_path / "evil.zip"
    png = encode(drawn_image(0, (64, 64)), "PNG")
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.png", png)
        z.writestr("../escaped.png", png)
        z.writestr("/absolute.png", png)
    (tmp_path / "box").mkdir()
    result = repair_dataset(archive, tmp_path / "box" / "clean", resolution=64)
    assert [a.output for a in result.actions] == ["ok.png"]
    assert sorted(p.name for p in (tmp_path / "box").rglob("*")) == ["clean", "ok.png"]
    assert not (tmp_path / "escaped.png").exists()


def test_cli_repair(tmp_path, capsys):
    from lorakit.cli import main

    src = tmp_path / "photos"
    write_problem_dataset(src)
    assert main(["prepare", "repair", str(src), "--output_dir", str(tmp_path / "clean"), "--resolution", "64",
                 "--max_side", "512", "--default_caption", "a drawing"]) == 0
    out = capsys.readouterr().out
    assert "dropped   corrupt.jpg  (unreadable)" in out and "re-check:" in out
    assert (tmp_path / "clean" / "no_caption.txt").read_text() == "a drawing\n"


def test_a_rerun_replaces_prepares_own_output_and_never_a_users_folder(tmp_path, capsys):
    """A notebook's Run-all runs prepare again over its earlier output: `replace_output` replaces what prepare
    wrote (files of an older input included) and refuses a folder of the user's."""
    import lorakit

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encode(drawn_image(i, (64, 64)), "PNG"))
    out, train = tmp_path / "repaired", tmp_path / "train"
    run = dict(action="repair", input_dir=str(src), output_dir=str(out), resolution=64)
    lorakit.prepare(**run)
    layout = dict(action="dreambooth", input_dir=str(out), output_dir=str(train), identifier="sks",
                  class_name="dog", repeats=3)
    lorakit.prepare(**layout)
    (src / "2.png").unlink()  # the input changed: 2.png in both outputs is now stale
    with pytest.raises(DatasetError, match="not empty.*replace_output"):
        lorakit.prepare(**run)
    with pytest.raises(DatasetError, match="already has files.*replace_output"):
        lorakit.prepare(**layout)
    lorakit.prepare(**run, replace_output=True)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["0.png", "1.png"]
    lorakit.prepare(**layout, replace_output=True)
    assert sorted(p.name for p in (train / "3_sks dog").iterdir()) == ["0.png", "1.png"]
    assert "replacing the earlier output" in capsys.readouterr().out

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("my notes")
    with pytest.raises(DatasetError, match="was not written by `lorakit prepare`"):
        lorakit.prepare(action="repair", input_dir=str(src), output_dir=str(mine), replace_output=True)
    assert (mine / "keep.txt").read_text() == "my notes"
    # the marker is invisible to training and to check
    assert [s.image_dir.name for s in subsets_from_folder(train, is_reg=False, caption_extension=".txt",
                                                         report=LoadReport())] == ["3_sks dog"]
    assert not check_dataset(out, 64).other_problems


def test_replace_output_never_deletes_a_file_added_or_edited_since(tmp_path):
    """A caption corrected by hand in prepare's output, or a file put there, is not prepare's to delete: the re-run
    is refused naming it, and goes ahead once it is moved out."""
    import lorakit

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.png").write_bytes(encode(drawn_image(i, (64, 64)), "PNG"))
    out = tmp_path / "repaired"
    run = dict(action="repair", input_dir=str(src), output_dir=str(out), resolution=64, default_caption="a dog")
    lorakit.prepare(**run)
    caption = out / "0.txt"
    time.sleep(0.01)
    caption.write_text("a dog, sitting, hand-corrected\n")
    with pytest.raises(DatasetError, match="would delete 1 file.*changed since: 0.txt; move them out"):
        lorakit.prepare(**run, replace_output=True)
    assert caption.read_text() == "a dog, sitting, hand-corrected\n"
    (out / "sub").mkdir()
    (out / "sub" / "notes.md").write_text("mine")
    with pytest.raises(DatasetError, match="would delete 2 file.*0.txt, sub/notes.md"):
        lorakit.prepare(**run, replace_output=True)
    caption.rename(tmp_path / "0.txt")
    shutil.rmtree(out / "sub")
    lorakit.prepare(**run, replace_output=True)
    assert (out / "0.txt").read_text() == "a dog\n"


def test_replace_output_replaces_the_set_aside_folder_too_unless_edited(tmp_path):
    import lorakit

    src = tmp_path / "photos"
    write_problem_dataset(src)
    run = dict(action="repair", input_dir=str(src), output_dir=str(tmp_path / "clean"), **FULL)
    lorakit.prepare(**run)
    aside = tmp_path / "clean_set_aside"
    moved = sorted(p for p in aside.rglob("*.png"))
    assert moved  # near-duplicates and too-small images set aside, listed in the folder's marker
    lorakit.prepare(**run, replace_output=True)
    assert sorted(p for p in aside.rglob("*.png")) == moved
    time.sleep(0.01)
    moved[0].write_bytes(b"edited")
    with pytest.raises(DatasetError, match=f"would delete 1 file.*clean_set_aside.*{moved[0].name}"):
        lorakit.prepare(**run, replace_output=True)
    assert moved[0].read_bytes() == b"edited"


def test_the_set_aside_folder_is_never_the_input_nor_a_folder_of_the_users(tmp_path):
    """`<output_dir>_set_aside` is marked as prepare's output (a later `replace_output` deletes it): it is refused
    when it is the input, or a folder of the user's that holds files; with nothing set aside it is left alone."""
    import lorakit

    src = tmp_path / "clean_set_aside"
    write_problem_dataset(src)
    with pytest.raises(DatasetError, match="images set aside would go to .*clean_set_aside, which is or holds the "
                                           "input"):
        lorakit.prepare(action="repair", input_dir=str(src), output_dir=str(tmp_path / "clean"), **FULL)
    photos = tmp_path / "photos"
    src.rename(photos)
    mine = tmp_path / "clean_set_aside"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="already holds files"):
        lorakit.prepare(action="repair", input_dir=str(photos), output_dir=str(tmp_path / "clean"), **FULL)
    lorakit.prepare(action="repair", input_dir=str(photos), output_dir=str(tmp_path / "clean2"))  # nothing set aside
    (tmp_path / "clean2_set_aside").mkdir()
    (tmp_path / "clean2_set_aside" / "notes.txt").write_text("mine")
    lorakit.prepare(action="repair", input_dir=str(photos), output_dir=str(tmp_path / "clean2"), replace_output=True)
    assert (tmp_path / "clean2_set_aside" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_marker_of_an_earlier_lorakit_lists_no_files(tmp_path):
    """Outputs marked before markers listed their files are replaced as they were then (the whole folder)."""
    from lorakit.dataprep.output import OUTPUT_MARKER, changed_since_marked, claim_output, mark_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"x")
    mark_output(out)
    assert changed_since_marked(out) == []
    (out / OUTPUT_MARKER).write_text("written by lorakit prepare; `replace_output = true` may replace it\n")
    assert changed_since_marked(out) is None
    claim_output(out, replace=True)
    assert not out.exists()


def test_replace_output_never_reaches_the_input_and_a_refused_run_writes_nothing(tmp_path):
    """An input inside the output (or the output inside the input) is refused before anything is deleted or
    written; a folder of the user's that an action wrote into is not marked as prepare's (never replaced later)."""
    import lorakit
    from lorakit.errors import ConfigError

    src = tmp_path / "photos"
    src.mkdir()
    (src / "0.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    train = tmp_path / "train"
    lorakit.prepare(action="dreambooth", input_dir=str(src), output_dir=str(train), identifier="sks",
                    class_name="dog", repeats=2)
    before = tree_hashes(train)
    with pytest.raises(ConfigError, match="must be a new folder outside `input_dir`"):
        lorakit.prepare(action="repair", input_dir=str(train / "2_sks dog"), output_dir=str(train),
                        replace_output=True)
    assert tree_hashes(train) == before  # the input survived
    with pytest.raises(ConfigError, match="outside `input_dir`"):
        lorakit.prepare(action="repair", input_dir=str(src), output_dir=str(src / "out"))
    assert sorted(p.name for p in src.iterdir()) == ["0.png"]  # nothing written into the originals
    with pytest.raises(ValueError):
        lorakit.prepare(action="repair", input_dir=str(src), output_dir=str(tmp_path / "new"), background="nope")
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    lorakit.prepare(action="dreambooth", input_dir=str(src), output_dir=str(mine), identifier="sks", class_name="dog",
                    repeats=2)
    with pytest.raises(DatasetError, match="was not written by `lorakit prepare`"):
        lorakit.prepare(action="dreambooth", input_dir=str(src), output_dir=str(mine), identifier="sks",
                        class_name="dog", repeats=2, replace_output=True)
    assert (mine / "notes.txt").read_text() == "my notes"


def test_names_that_would_share_a_caption_file_are_kept_apart(tmp_path):
    """`café.png` becomes `cafe.png` with `ascii_names`, next to `cafe.jpg`: each must keep its own caption."""
    src = tmp_path / "s"
    src.mkdir()
    (src / "café.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    (src / "café.txt").write_text("one")
    (src / "cafe.jpg").write_bytes(encode(drawn_image(1, (64, 64)), "JPEG"))
    (src / "cafe.txt").write_text("two")
    repair_dataset(src, tmp_path / "r", resolution=64, ascii_names=True)
    out = tmp_path / "r"
    images = sorted(p for p in out.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) == 2 and len({p.stem for p in images}) == 2
    assert sorted(p.with_suffix(".txt").read_text().strip() for p in images) == ["one", "two"]


def test_keep_alpha_keeps_the_transparency_that_alpha_mask_trains_with(tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.data.images import load_alpha

    src = tmp_path / "cutouts"
    src.mkdir()
    rgb = drawn_image(1, (64, 64))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1)))  # a left-to-right ramp
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    rgba.save(src / "plain.png")  # nothing else to fix: copied byte for byte
    big = rgba.resize((256, 256), Image.Resampling.NEAREST)
    big.save(src / "big.png")  # shrunk, its transparency with it
    Image.merge("LA", (rgb.convert("L"), alpha)).save(src / "grey_alpha.png")
    exif = Image.Exif()  # stored sideways, with the EXIF tag that turns it upright
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rgba.transpose(Image.Transpose.ROTATE_90).save(src / "rotated.png", exif=exif)
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    palette.save(src / "palette.png", transparency=0)
    for p in src.glob("*.png"):
        p.with_suffix(".txt").write_text("a cutout")
    assert main(["prepare", "repair", str(src), "--output_dir", str(tmp_path / "kept"), "--resolution", "64",
                 "--max_side", "128", "--keep_alpha"]) == 0
    assert "re-check:" in capsys.readouterr().out
    kept = tmp_path / "kept"
    assert (kept / "plain.png").read_bytes() == (src / "plain.png").read_bytes()
    with Image.open(kept / "big.png") as im:
        assert im.mode == "RGBA" and im.size == (128, 128)
        ramp = np.asarray(im.getchannel("A"), dtype=float)[64]
        assert ramp[0] < 10 and ramp[-1] > 245 and np.all(np.diff(ramp) >= -1)  # the ramp, halved
    assert (kept / "grey_alpha.png").read_bytes() == (src / "grey_alpha.png").read_bytes()  # grey is fine as it is
    with Image.open(kept / "palette.png") as im:
        a = np.asarray(im.convert("RGBA").getchannel("A"))
        want = np.asarray(palette.convert("RGBA").getchannel("A"))
        assert im.mode == "RGBA" and np.array_equal(a, want) and 0 < (a == 0).mean() < 1
    with Image.open(kept / "rotated.png") as im:  # turned upright, the transparency with it
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), np.asarray(rgba))
    # what alpha_mask trains with is the original transparency
    assert np.array_equal(np.asarray(load_alpha(kept / "grey_alpha.png")), np.asarray(alpha))
    # without keep_alpha, the same images come out opaque (composited on `background`)
    repair_dataset(src, tmp_path / "flat", resolution=64, max_side=128)
    for p in (tmp_path / "flat").glob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "RGB", p.name


def test_of_two_identical_images_the_captioned_one_is_kept(tmp_path):
    """Dropping an exact duplicate keeps the copy that has a caption, wherever it sorts."""
    import lorakit

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "IMG_0001.png")
    (folder / "IMG_0002.png").write_bytes((folder / "IMG_0001.png").read_bytes())
    (folder / "IMG_0002.txt").write_text("a red square")
    result = lorakit.prepare(action="repair", input_dir=str(folder), output_dir=str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "IMG_0002.png", "IMG_0002.txt"]
    assert [(a.source, a.action) for a in result.actions if a.action == "dropped"] == [("IMG_0001.png", "dropped")]
