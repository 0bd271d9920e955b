"""DreamBooth layout: `<repeats>_<identifier> <class>` folders the trainer's loader reads, with suggested repeats."""

from __future__ import annotations

import hashlib

import pytest

from lorakit.data.folders import LoadReport, scan_subset, subsets_from_folder
from lorakit.dataprep import make_dreambooth_layout, prepare, steps_per_epoch, suggest_repeats
from lorakit.dataprep.layout import folder_name
from lorakit.dataprep.samples import drawn_image, encode
from lorakit.errors import ConfigError, DatasetError


@pytest.fixture
def flat(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        (folder / f"img{i}.png").write_bytes(encode(drawn_image(i, (64, 64)), "PNG"))
    (folder / "img0.txt").write_text("sks dog, on a sofa")
    return folder


def test_steps_and_repeats_arithmetic():
    assert steps_per_epoch(20, 8) == 160
    assert steps_per_epoch(21, 3, batch_size=2) == 32  # ceil(63 / 2)
    assert steps_per_epoch(20, 8, with_reg=True) == 320
    assert suggest_repeats(20, target_steps=1600, epochs=10) == 8
    assert suggest_repeats(20, target_steps=1600, epochs=10, with_reg=True) == 4
    assert suggest_repeats(20, target_steps=1600, epochs=10, batch_size=2) == 16
    assert suggest_repeats(500, target_steps=100, epochs=10) == 1  # never below 1
    for n in (3, 17, 40):
        r = suggest_repeats(n, target_steps=1500, epochs=10)
        assert abs(steps_per_epoch(n, r) * 10 - 1500) <= n * 10 / 2 + 1  # as close as whole repeats allow
    with pytest.raises(ValueError, match="no images"):
        suggest_repeats(0)


def test_layout_is_read_by_the_trainer_loader(flat, tmp_path, capsys):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in flat.iterdir()}
    layout = make_dreambooth_layout(flat, tmp_path / "train", "sks", "dog", target_steps=200, epochs=4)
    assert layout.repeats == 10 and layout.steps_per_epoch == 50 and layout.epochs_for_target == 4
    assert layout.folder == tmp_path / "train" / "10_sks dog"
    assert "50 steps per epoch" in capsys.readouterr().out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in flat.iterdir()} == before

    report = LoadReport()
    subsets = subsets_from_folder(tmp_path / "train", is_reg=False, caption_extension=".txt", report=report)
    assert [(s.num_repeats, s.class_tokens) for s in subsets] == [(10, "sks dog")]
    items = scan_subset(subsets[0], report)
    captions = {it.path.name: it.caption for it in items}
    assert captions == {"img0.png": "sks dog, on a sofa", "img1.png": "sks dog", "img2.png": "sks dog",
                        "img3.png": "sks dog", "img4.png": "sks dog"}
    assert report.skipped == [] and report.notes == []


def test_explicit_repeats_nested_sources_and_errors(tmp_path):
    src = tmp_path / "src"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        (src / sub / "x.png").write_bytes(encode(drawn_image(len(sub), (64, 64)), "PNG"))
    layout = make_dreambooth_layout(src, tmp_path / "out", "ohwx", "woman", repeats=3, verbose=False)
    assert sorted(p.name for p in layout.folder.iterdir()) == ["b_x.png", "x.png"]
    assert layout.folder.name == "3_ohwx woman" and layout.steps_per_epoch == 6
    with pytest.raises(DatasetError, match="outside"):
        make_dreambooth_layout(src, src / "out", "ohwx", "woman")
    with pytest.raises(DatasetError, match="already has files"):
        make_dreambooth_layout(src, tmp_path / "out", "ohwx", "woman", repeats=3)
    with pytest.raises(ValueError, match="identifier"):
        folder_name(1, "", "dog")
    with pytest.raises(ValueError, match="class_name"):
        folder_name(1, "sks", "a/b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        make_dreambooth_layout(tmp_path / "empty", tmp_path / "out2", "sks", "dog")
    # files that only have an image's name are left out, and not counted in the repeats' steps
    (src / "a" / "fake.jpg").write_text("not an image")
    (src / "a" / "cut.png").write_bytes(encode(drawn_image(5, (64, 64)), "PNG")[:60])
    layout = make_dreambooth_layout(src, tmp_path / "out3", "ohwx", "woman", repeats=3, verbose=False)
    assert sorted(p.name for p in layout.folder.iterdir()) == ["b_x.png", "x.png"] and layout.n_images == 2
    (tmp_path / "fakes").mkdir()
    (tmp_path / "fakes" / "a.png").write_text("text")
    with pytest.raises(DatasetError, match=r"no images .*: its 1 file\(s\) with an image's name do not decode"):
        make_dreambooth_layout(tmp_path / "fakes", tmp_path / "out4", "sks", "dog")


def test_prepare_dreambooth_action(flat, tmp_path, capsys):
    layout = prepare(action="dreambooth", input_dir=str(flat), output_dir=str(tmp_path / "db"), identifier="sks",
                     class_name="dog", target_steps=100, epochs=5, train_batch_size=2, with_reg=True)
    assert layout.repeats == 4  # 100 / 5 = 20 steps per epoch = 5 images x 4 repeats x 2 (reg) / 2 (batch)
    assert layout.steps_per_epoch == 20
    assert (tmp_path / "db" / "4_sks dog" / "img0.txt").read_text() == "sks dog, on a sofa"
    assert "20 steps per epoch" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="`identifier` is required"):
        prepare(action="dreambooth", input_dir=str(flat), output_dir=str(tmp_path / "db2"), class_name="dog")


def test_flattening_keeps_every_image_with_its_own_caption(tmp_path):
    """Sub-folders are flattened into one DreamBooth folder: images that would share a name or a stem (and so a
    caption file) get distinct names; none is lost or overwritten, each keeps its caption."""
    import hashlib

    from lorakit.dataprep import make_dreambooth_layout
    from lorakit.dataprep.samples import drawn_image, encode

    src = tmp_path / "src"
    for rel, seed, caption in [("sub1/x.png", 0, "a cat"), ("sub2/x.jpg", 1, "a dog"), ("a/b_x.png", 2, None),
                               ("a/x.png", 3, "a fox"), ("b/x.png", 4, "a cow")]:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(drawn_image(seed, (64, 64)), "JPEG" if rel.endswith(".jpg") else "PNG"))
        if caption:
            path.with_suffix(".txt").write_text(caption)
    layout = make_dreambooth_layout(src, tmp_path / "train", "sks", "dog", repeats=2)
    out = tmp_path / "train" / "2_sks dog"
    digest = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in src.rglob("*") if p.suffix in (".png", ".jpg")}
    written = [p for p in out.iterdir() if p.suffix in (".png", ".jpg")]
    assert layout.n_images == 5 and len(written) == 5
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in written} == set(digest)  # every image, once
    for p in written:
        original = digest[hashlib.sha256(p.read_bytes()).hexdigest()]
        caption = original.with_suffix(".txt")
        mine = p.with_suffix(".txt")
        assert (mine.read_text() if mine.exists() else None) == (caption.read_text() if caption.exists() else None)


def test_zip_members_named_with_dot_slash_or_backslashes(tmp_path):
    import zipfile

    from lorakit.dataprep import check_dataset, make_dreambooth_layout
    from lorakit.dataprep.samples import drawn_image, encode

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("./top.png", encode(drawn_image(0, (64, 64)), "PNG"))
        z.writestr("./top.txt", "a cat")
        z.writestr("sub\\a.png", encode(drawn_image(1, (64, 64)), "PNG"))
    assert sorted(r.path for r in check_dataset(archive, 64).records) == ["sub/a.png", "top.png"]
    make_dreambooth_layout(archive, tmp_path / "train", "sks", "cat", repeats=1)
    assert sorted(p.name for p in (tmp_path / "train" / "1_sks cat").iterdir()) == ["a.png", "top.png", "top.txt"]
    # repair and caption edits read members without listing them first (Windows' PowerShell writes `sub\a.png`)
    import lorakit
    from lorakit.dataprep.sources import DatasetSource

    with DatasetSource(archive) as src:
        assert src.read("sub/a.png")[:4] == b"\x89PNG"
    lorakit.prepare(action="repair", input_dir=str(archive), output_dir=str(tmp_path / "clean"))
    assert sorted(p.relative_to(tmp_path / "clean").as_posix() for p in (tmp_path / "clean").rglob("*.*")
                  if not p.name.startswith(".")) == ["sub/a.png", "top.png", "top.txt"]
    lorakit.prepare(action="captions", input_dir=str(archive), output_dir=str(tmp_path / "cap"), trigger="sks")
    assert (tmp_path / "cap" / "top.txt").read_text().startswith("sks")


def test_a_second_layout_of_the_same_concept_with_other_repeats_is_refused(tmp_path):
    """Another concept may join the folder (kohya trains several); the same concept again would double its draws."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    make_dreambooth_layout(src, tmp_path / "train", "sks", "dog", repeats=40)
    with pytest.raises(DatasetError, match="already has `40_sks dog` for the same identifier and class"):
        make_dreambooth_layout(src, tmp_path / "train", "sks", "dog", repeats=5)
    make_dreambooth_layout(src, tmp_path / "train", "ohwx", "cat", repeats=5)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["40_sks dog", "5_ohwx cat"]


def test_a_replace_output_run_that_fails_leaves_the_earlier_output(flat, tmp_path, monkeypatch):
    """The earlier output is deleted only once the new one is complete: a re-run that fails midway (a full disk)
    puts it back as it was, and a later re-run still replaces it."""
    import errno

    import lorakit.dataprep.layout as layout

    out = tmp_path / "db"
    run = dict(action="dreambooth", input_dir=str(flat), output_dir=str(out), identifier="sks", class_name="dog",
               repeats=5)
    prepare(**run)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = layout.write_bytes, []

    def disk_full_at_the_third(dest, data):
        calls.append(dest)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real(dest, data)

    monkeypatch.setattr(layout, "write_bytes", disk_full_at_the_third)
    with pytest.raises(OSError, match="No space left"):
        prepare(**run, replace_output=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "flat"]  # nothing left aside
    monkeypatch.setattr(layout, "write_bytes", real)
    prepare(**run, replace_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "flat"]


def test_replace_output_replaces_the_latents_training_cached_in_it(flat, tmp_path):
    """A notebook's Run-all: prepare, train with `cache_latents_to_disk` (the cache lands beside the images), and
    prepare again; the cache is lorakit's own, so it does not count as a file the user added."""
    out = tmp_path / "db"
    run = dict(action="dreambooth", input_dir=str(flat), output_dir=str(out), identifier="sks", class_name="dog",
               repeats=2)
    prepare(**run)
    cache = out / "2_sks dog" / ".lorakit_latents"
    cache.mkdir()
    (cache / "img0.png.64x64.safetensors").write_bytes(b"cached latents")
    (out / "2_sks dog" / "mine.txt").write_text("a file of the user's")
    with pytest.raises(DatasetError, match=r"would delete 1 file\(s\) .*: 2_sks dog/mine.txt; move them"):
        prepare(**run, replace_output=True)
    (out / "2_sks dog" / "mine.txt").unlink()
    prepare(**run, replace_output=True)
    assert not cache.exists() and (out / "2_sks dog" / "img0.png").is_file()
