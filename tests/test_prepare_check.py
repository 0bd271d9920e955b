"""`prepare check`: every problem kind is found and named, on folders and zips; the report serialises."""

from __future__ import annotations

import json
import unicodedata
import zipfile

import pytest
from PIL import Image

from lorakit.cli import main
from lorakit.dataprep import KINDS, DatasetReport, check_dataset, contact_sheet, prepare
from lorakit.dataprep.contact_sheet import FRAME
from lorakit.dataprep.samples import drawn_image, encode, write_problem_dataset
from lorakit.dataprep.tokens import estimate_tokens
from lorakit.errors import ConfigError, DatasetError, ModelLoadError


@pytest.fixture(scope="module")
def problem_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("problems")
    return folder, write_problem_dataset(folder)


def paths_by_kind(report: DatasetReport) -> dict[str, list[str]]:
    return {kind: sorted(p.path for p in items) for kind, items in report.problems.items()}


def test_fixture_plants_every_kind(problem_dataset):
    _, expected = problem_dataset
    assert set(expected) == set(KINDS)


def test_report_names_each_problem(problem_dataset):
    folder, expected = problem_dataset
    report = check_dataset(folder, resolution=64)
    assert paths_by_kind(report) == {k: sorted(v) for k, v in expected.items()}
    good = [r for r in report.records if r.path.startswith("good_") and r.path != "good_0_copy.png"]
    assert len(good) == 5 and all(not r.problems for r in good)
    assert not report.ok
    text = report.summary() + report.to_markdown()
    for kind, paths in expected.items():
        assert kind in text
        for p in paths:
            assert p in report.to_markdown()


def test_per_image_facts(problem_dataset):
    folder, _ = problem_dataset
    report = check_dataset(folder, resolution=64)
    rotated = report.record("rotated.jpg")
    assert (rotated.orientation, rotated.width, rotated.height) == (6, 96, 72)  # stored 72x96, displayed upright
    assert report.record("deep_rgb48.png").bit_depth == 16
    assert report.record("cmyk.jpg").mode == "CMYK"
    assert report.record("palette.png").mode == "P"
    assert report.record("good_0_copy.png").duplicate_of == "good_0.png"
    assert "good_1.png" in report.record("similar_to_good_1.jpg").problems[0].detail
    assert report.record("huge.jpg").width == 2200
    assert report.record("truncated.jpg").readable is False
    assert report.record("good_1.png").caption == "a drawing, good 1"
    assert report.record("two_lines.png").caption == "a drawing, second line"
    assert report.record("latin1_caption.png").caption == "café au lait"
    assert report.record("good_1.png").bucket == (64, 64)


def test_buckets_follow_aspect_ratio(tmp_path):
    encode_to = {"wide.png": (768, 512), "tall.png": (512, 768), "square.png": (600, 600)}
    for name, size in encode_to.items():
        (tmp_path / name).write_bytes(encode(drawn_image(len(name), size), "PNG"))
        (tmp_path / name).with_suffix(".txt").write_text("x")
    report = check_dataset(tmp_path, resolution=512)
    for name, (w, h) in encode_to.items():
        bw, bh = report.record(name).bucket
        assert abs(bw / bh - w / h) < 0.2, (name, bw, bh)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
    assert report.record("wide.png").bucket[0] > 512 > report.record("wide.png").bucket[1]
    # a small model's resolution (the toy's 32 px), below min_bucket_reso: square crops, and images large enough
    small = check_dataset(tmp_path, resolution=32)
    assert {small.record(name).bucket for name in encode_to} == {(32, 32)}
    assert "below min_bucket_reso 256" in small.bucketing
    assert not any(p.kind == "too_small" for name in encode_to for p in small.record(name).problems)


def test_json_roundtrip(problem_dataset):
    folder, expected = problem_dataset
    report = check_dataset(folder, resolution=64)
    data = json.loads(report.to_json())
    assert data["summary"] == {k: len(v) for k, v in report.problems.items()}
    again = DatasetReport.from_dict(data)
    assert paths_by_kind(again) == paths_by_kind(report)
    assert again.record("rotated.jpg").bucket == report.record("rotated.jpg").bucket


def test_zip_gives_the_same_report(problem_dataset, tmp_path):
    folder, expected = problem_dataset
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"photos/{f.name}")
    report = check_dataset(archive, resolution=64)
    assert paths_by_kind(report) == {k: sorted(f"photos/{p}" for p in v) for k, v in expected.items()}


def test_caption_lengths_with_a_tokenizer_and_estimated(tmp_path):
    for i, n_words in enumerate((75, 76)):
        (tmp_path / f"img{i}.png").write_bytes(encode(drawn_image(i, (64, 64)), "PNG"))
        (tmp_path / f"img{i}.txt").write_text(" ".join(["word"] * n_words))
    report = check_dataset(tmp_path, resolution=64, tokenizer=lambda text: text.split())
    assert report.token_counter == "clip"
    assert [r.caption_tokens for r in report.records] == [75, 76]
    assert [p.path for p in report.problems["caption_too_long"]] == ["img1.png"]
    assert check_dataset(tmp_path, resolution=64).token_counter == "estimate"
    assert estimate_tokens("a photo of a dog") == 5
    assert estimate_tokens("1girl, red_hair") == 6  # digit, word, comma, word, underscore, word


def test_caption_found_across_unicode_normalisations_and_dreambooth_folders(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    (tmp_path / f"{nfc}.png").write_bytes(encode(drawn_image(1, (64, 64)), "PNG"))
    (tmp_path / f"{nfd}.txt").write_text("a cafe")  # as macOS writes the name
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    (sub / "a.png").write_bytes(encode(drawn_image(2, (64, 64)), "PNG"))  # folder tokens are its caption
    report = check_dataset(tmp_path, resolution=64)
    assert "missing_caption" not in report.problems
    assert report.record(f"{nfc}.png").caption == "a cafe"


def test_check_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        check_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder and not a .zip"):
        check_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="resolution"):
        check_dataset(tmp_path, resolution=4)


def test_contact_sheet_marks_problems(problem_dataset):
    folder, _ = problem_dataset
    report = check_dataset(folder, resolution=64)
    sheet = contact_sheet(report, columns=4, thumb=64)
    cell_w, cell_h = 64 + 12, 64 + 12 + 30
    assert sheet.size == (4 * cell_w, -(-len(report.records) // 4) * cell_h)
    for n, rec in enumerate(report.records):
        x, y = (n % 4) * cell_w, (n // 4) * cell_h
        frame = sheet.getpixel((x + 2, y + 20))
        if rec.problems:
            worst = min((p.severity for p in rec.problems), key=["error", "warning", "note"].index)
            assert frame == FRAME[worst], rec.path
        else:
            assert frame == (255, 255, 255), rec.path
    only = contact_sheet(report, only_problems=True, columns=4, thumb=64)
    assert only.size[1] < sheet.size[1] or len([r for r in report.records if not r.problems]) < 4


def test_prepare_check_and_cli(problem_dataset, tmp_path, capsys):
    folder, expected = problem_dataset
    report = prepare(action="check", input_dir=str(folder), resolution=64)
    assert set(report.problems) == set(expected)
    assert "truncated" in capsys.readouterr().out
    out, sheet = tmp_path / "report.json", tmp_path / "sheet.png"
    assert main(["prepare", "check", str(folder), "--resolution", "64", "--report_file", str(out),
                 "--contact_sheet_file", str(sheet)]) == 0
    assert json.loads(out.read_text())["summary"]["empty_file"] == 1
    with Image.open(sheet) as im:
        assert im.size == report.contact_sheet().size
    assert main(["prepare", "repair", str(folder)]) == 2
    assert "`output_dir` is required for `prepare repair`" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="new folder"):
        prepare(action="repair", input_dir=str(folder), output_dir=str(folder))


def test_exact_token_counts_with_the_model_tokenizer(tmp_path, tiny_sd1_dir):
    (tmp_path / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    (tmp_path / "a.txt").write_text("a photo, of a dog")
    report = prepare(action="check", input_dir=str(tmp_path), resolution=64, tokenizer_model=str(tiny_sd1_dir))
    assert report.token_counter == "clip"
    from lorakit.dataprep import load_tokenizer

    assert report.record("a.png").caption_tokens == len(load_tokenizer(str(tiny_sd1_dir)).tokenize("a photo, of a dog"))
    with pytest.raises(ModelLoadError, match="no CLIP tokenizer"):
        prepare(action="check", input_dir=str(tmp_path), tokenizer_model=str(tmp_path))


def test_check_reads_nothing_it_should_not_write(problem_dataset):
    folder, _ = problem_dataset
    before = {p: p.read_bytes() for p in folder.iterdir()}
    check_dataset(folder, resolution=64)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_unreadable_thumbnail_tile_is_grey(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = check_dataset(tmp_path, resolution=64)
    assert [p.path for p in report.problems["unreadable"]] == ["bad.png"]
    sheet = contact_sheet(report, thumb=64)
    assert isinstance(sheet, Image.Image)
    assert sheet.getpixel((6 + 10, 6 + 30)) == (200, 200, 200)


def test_perceptual_hash_survives_resizing_but_separates_images():
    from lorakit.dataprep.hashing import colour_signature, dhash, near_duplicate_pairs

    a = drawn_image(3, (200, 150))
    smaller = a.resize((120, 90), Image.Resampling.LANCZOS)
    other = drawn_image(4, (200, 150))
    dist = lambda x, y: bin(dhash(x) ^ dhash(y)).count("1")  # noqa: E731
    assert dist(a, smaller) <= 4 < 16 <= dist(a, other)
    flat_red, flat_blue = Image.new("RGB", (50, 50), (255, 0, 0)), Image.new("RGB", (50, 50), (0, 0, 255))
    assert dhash(flat_red) == dhash(flat_blue) == 0  # why the colour signature is needed too
    images = [a, smaller, other, flat_red, flat_blue]
    pairs = near_duplicate_pairs([dhash(x) for x in images], [colour_signature(x) for x in images])
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_empty_folder_and_unsupported_photo_formats(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(40))
    report = check_dataset(tmp_path)
    assert report.n_images == 0 and "No images found" in report.summary()
    assert [(p.kind, p.path) for p in report.other_problems] == [("not_image", "IMG_0001.HEIC")]
    assert "export it as JPEG" in report.other_problems[0].detail


def test_check_reports_never_replace_a_file_check_did_not_write(tmp_path):
    """Running check again replaces its own report and sheet; a picture or JSON of the user's is refused."""
    import lorakit
    from lorakit.dataprep.samples import drawn_image, encode
    from lorakit.errors import ConfigError

    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(encode(drawn_image(0, (64, 64)), "PNG"))
    run = dict(action="check", input_dir=str(src), resolution=64, report_file=str(tmp_path / "r.json"),
               contact_sheet_file=str(tmp_path / "sheet.png"))
    lorakit.prepare(**run)
    lorakit.prepare(**run)  # its own files: replaced
    mine = tmp_path / "mypic.png"
    mine.write_bytes(encode(drawn_image(1, (64, 64)), "PNG"))
    before = mine.read_bytes()
    with pytest.raises(ConfigError, match="`contact_sheet_file` .*mypic.png exists and is not a report"):
        lorakit.prepare(**{**run, "contact_sheet_file": str(mine)})
    (tmp_path / "notes.json").write_text('{"my": "notes"}')
    with pytest.raises(ConfigError, match="`report_file` .*notes.json exists"):
        lorakit.prepare(**{**run, "report_file": str(tmp_path / "notes.json")})
    with pytest.raises(ConfigError, match="`contact_sheet_file` must end in .png"):
        lorakit.prepare(**{**run, "contact_sheet_file": str(tmp_path / "sheet.jpg")})
    assert mine.read_bytes() == before and (tmp_path / "notes.json").read_text() == '{"my": "notes"}'


# a 64x48 JPEG with an EXIF orientation (6) and one malformed EXIF entry, from byte-flip fuzzing: Pillow's
# `exif_transpose` raises struct.error on it, as on some cameras' files
MALFORMED_EXIF_JPEG = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/4QBARXhpZgAATU0AKgAAAAgAAwEoAAIAAAAGAAAAMgEQAAIAAAAERU9TAAESAAMAAAABAAYA"
    "AOUAAABDYW5vbgD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxyKKDcpLDAxNDQ0Hyc5PTgy"
    "PC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/"
    "wAARCAAwAEADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQID"
    "AAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZn"
    "aGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx"
    "8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJB"
    "UQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3"
    "eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6"
    "/9oADAMBAAIRAxEAPwDGstPkaUcV2ljp8kNuGI4qtbW3kyA7a0r3VBDZFQO1aYueHyf3aLu5HDjsXlmczXtZ2aCLUo4JArMOKuXV"
    "8l5amNDkkV5be63Kb0gA4zWpZ648CBznivmcfgpVa0a+I06n02Bwap0+bDa2Ls3hu5+1edtO3OavyzLBaeUx5Aqi3jzcnk7PbpVQ"
    "XJ1GTd619NXqyxVCMKeyR4ebRxmZzTxUbKJmSoWuyw6ZrZtnCxgVaXRSY94FVJIJImwFNLKMKpNqlqzmtkuIioV5tNHdzWkaoSMV"
    "iXMCzOY6sTa5D5JANYsetxC7yTxms8RB5cubEQ5+1zzOHst+uS5px5bEkvhOJh5uz9KqHSIVby2GBXWrr1m9ptBGcVzd1N505KGr"
    "yzGUsyUvbxskfXY+vVoU+RLk/UrTeHrJYjIMZqpYxrDeBB0zWn5M8q4BNRJpM0cvmGorY+GHvQoK99L9jw8uz+vhJuliaXMpdzvt"
    "LtraW1TeRV46NpL8syZrior2WOPy1Yg00/2hI2VkbFeLaeRt1Pac3N+BGdUYYa1WNH4inLojEYzWNf6M1urSA8iuomuWCk1nLIbu"
    "fy36GunD5pXqJxzB83Y+oyjKMTRhKUnqcL/aVxDceWAxGa6CxupWQMymu+03wRZXW2RowSfatW/8I2lpZMyIOB6V1YSrh6LbmtGc"
    "qlUxFflxuqT0PP8A+1Rbx7sdKjtvFBubgQbevFVb+EC9aLtnFbGlaBAGWbbz1qa+ZZdSdqUdWb8SYOPs4To6WNldNza/afbNYF14"
    "nFjIY8dK6i+lMOnmNemK8s1hd9yxPrXdgsPgcar4mNzw8vq4rMvcqu9j/9k=")


def test_an_image_whose_exif_pillow_cannot_rewrite_is_still_read_upright(tmp_path):
    """`check` (and the trainer's loader) must not crash on a malformed EXIF block: the orientation tag alone is
    applied (64x48 turned to 48x64)."""
    import base64

    from lorakit.data.images import load_rgb

    path = tmp_path / "imgs" / "phone.jpg"
    path.parent.mkdir()
    path.write_bytes(base64.b64decode("".join(MALFORMED_EXIF_JPEG)))
    report = check_dataset(path.parent, 512)
    assert [r.path for r in report.records] == ["phone.jpg"]
    assert load_rgb(path).size == (48, 64)


def test_an_image_that_fails_to_decode_in_any_way_is_listed(tmp_path, monkeypatch):
    """Malformed files make Pillow raise more than OSError (a TIFF with a float offset: TypeError): listed as
    unreadable by `check`, skipped with the reason by the trainer's loader."""
    from PIL import ImageFile

    from lorakit.data.images import ImageProblem, load_rgb

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "good.png")
    Image.new("RGB", (32, 32), "red").save(folder / "bad.png")  # the size marks the file that fails
    real = ImageFile.ImageFile.load

    def load(self):
        if self.size == (32, 32):
            raise TypeError("'float' object cannot be interpreted as an integer")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    report = check_dataset(folder, 512)
    kinds = {r.path: r.kinds() for r in report.records}
    assert "unreadable" in kinds["bad.png"] and "unreadable" not in kinds["good.png"]
    with pytest.raises(ImageProblem, match="corrupt or truncated .*'float' object"):
        load_rgb(folder / "bad.png")
    assert load_rgb(folder / "good.png").size == (64, 64)


def test_a_windows_1252_caption_is_read_as_the_trainer_reads_it_and_repaired_to_utf8(tmp_path):
    """Windows editors write smart quotes as bytes 0x92-0x94: `check` reads them as Windows-1252, as training does,
    and `repair` writes them out as UTF-8 — not as Latin-1 control characters."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"woman\x92s \x93red\x94 dress")
    report = check_dataset(folder, 512)
    assert report.records[0].caption == "woman’s “red” dress"
    assert "caption_encoding" in report.records[0].kinds()
    prepare(action="repair", input_dir=str(folder), output_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8").strip() == "woman’s “red” dress"


def test_a_png_with_bytes_after_its_end_chunk_is_not_truncated(tmp_path):
    """Some tools append data after IEND, which decoders ignore: the image is fine; a PNG cut short is not."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "trailing.png").write_bytes(buf.getvalue() + b"\0" * 200)
    (folder / "cut.png").write_bytes(buf.getvalue()[:-20])
    kinds = {r.path: r.kinds() for r in check_dataset(folder, 512).records}
    assert "truncated" not in kinds["trailing.png"] and "truncated" in kinds["cut.png"]
