"""Aspect-ratio buckets: the tables, the closest-aspect choice, and never enlarging with `bucket_no_upscale`."""

from __future__ import annotations

import collections
import itertools
import math
import random

import pytest

from lorakit.data.buckets import bucket_range, crop_box, fixed_size_choice, make_bucket_resolutions, select_bucket

# The table for 512 worked by hand from the documented rule (KOHYA_FORMAT.md §8, sd-scripts make_bucket_resolutions):
# width w from 256 to 1024 step 64, height = min(1024, floor(512*512 / w / 64) * 64), kept when ≥ 256, both ways.
TABLE_512 = sorted({
    (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320),
    (832, 256), (896, 256), (960, 256), (1024, 256),
    (1024, 256), (768, 320), (640, 384), (576, 448), (320, 704), (256, 832), (256, 896), (256, 960),
})


def test_table_512_matches_documented_rule():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == TABLE_512


def test_bucket_limits_off_the_steps_are_rounded_out_as_sd_scripts_does():
    """sd-scripts rounds `min_bucket_reso` down and `max_bucket_reso` up to `bucket_reso_steps`: 300 → 256 and
    1000 → 1024 give the standard table, every side a multiple of the step (not 300x832 or 256x1000)."""
    assert bucket_range(300, 1000, 64) == (256, 1024) and bucket_range(256, 1024, 64) == (256, 1024)
    assert make_bucket_resolutions((512, 512), 300, 1000, 64) == TABLE_512
    assert all(w % 48 == 0 and h % 48 == 0 for w, h in make_bucket_resolutions((768, 768), 250, 1000, 48))


def test_table_768_properties():
    table = make_bucket_resolutions((768, 768), 256, 1024, 64)
    area = 768 * 768
    assert (768, 768) in table
    for w, h in table:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= area
        assert (h, w) in table  # both orientations
    # every width of the sweep whose rounded height fits appears, with the largest height that keeps the area
    for w in range(256, 1025, 64):
        h = min(1024, (area // w) // 64 * 64)
        assert ((w, h) in table) == (h >= 256)
    # hand-checked entries: 576 -> 1024 (589824/576=1024), 640 -> 896 (921 -> 14*64), 1024 -> 576
    assert {(576, 1024), (640, 896), (1024, 576), (896, 640)} <= set(table)
    assert (1024, 640) not in table  # 1024*640 exceeds the area


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (512, 512), (3000, 1000), (333, 777), (2048, 1536),
                                  (100, 90), (64, 4000)])
def test_closest_aspect_and_cover(size):
    table = make_bucket_resolutions((512, 512))
    choice = select_bucket(size, table, max_area=512 * 512)
    aspect = size[0] / size[1]
    best = min(abs(w / h - aspect) for w, h in table)
    assert abs(choice.bucket[0] / choice.bucket[1] - aspect) == pytest.approx(best)
    # the resized image covers the bucket and keeps the image's aspect ratio (to rounding)
    assert choice.resized[0] >= choice.bucket[0] and choice.resized[1] >= choice.bucket[1]
    assert min(choice.resized[0] - choice.bucket[0], choice.resized[1] - choice.bucket[1]) <= 1
    assert choice.resized[0] / choice.resized[1] == pytest.approx(aspect, rel=0.02)


def test_exact_size_bucket_wins():
    table = make_bucket_resolutions((512, 512))
    assert select_bucket((384, 640), table, max_area=512 * 512).bucket == (384, 640)


@pytest.mark.parametrize("w,h", list(itertools.product([70, 200, 511, 512, 700, 1500, 4000], [90, 300, 512, 2000])))
def test_no_upscale_never_enlarges(w, h):
    choice = select_bucket((w, h), None, max_area=512 * 512, steps=64, no_upscale=True) if min(w, h) >= 64 else None
    if choice is None:
        with pytest.raises(ValueError, match="bucket_reso_steps"):
            select_bucket((w, h), None, max_area=512 * 512, steps=64, no_upscale=True)
        return
    bw, bh = choice.bucket
    rw, rh = choice.resized
    assert rw <= w and rh <= h  # never enlarged
    assert bw <= rw and bh <= rh  # the bucket is cropped from the (possibly shrunk) image
    assert bw % 64 == 0 and bh % 64 == 0
    assert bw * bh <= 512 * 512 * 1.01
    if w * h <= 512 * 512:
        assert (rw, rh) == (w, h)  # small images are not resized at all
    else:
        assert rw / rh == pytest.approx(w / h, rel=0.05)


def test_fixed_size_covers_and_crops_centre():
    choice = fixed_size_choice((300, 200), (64, 64))
    assert choice.bucket == (64, 64) and choice.resized == (96, 64)
    assert crop_box(choice.resized, choice.bucket) == (16, 0, 80, 64)
    assert crop_box((96, 64), (64, 64), random_offset=(0.0, 0.0)) == (0, 0, 64, 64)
    assert crop_box((96, 64), (64, 64), random_offset=(1.0, 1.0)) == (32, 0, 96, 64)


@pytest.mark.parametrize("resized, bucket, left_top", [((683, 384), (640, 384), (21, 0)),  # 1920x1080 in 640x384
                                                       ((512, 771), (512, 768), (0, 1)), ((98, 64), (64, 64), (17, 0))])
def test_the_centre_crop_leaves_the_odd_pixel_on_the_right_as_sd_scripts(resized, bucket, left_top):
    """sd-scripts crops at `excess // 2`; rounding half to even put the crop 1 px further for an excess of 43 or 3."""
    assert crop_box(resized, bucket)[:2] == left_top


def test_every_random_crop_position_is_equally_likely():
    """sd-scripts draws `randint(0, excess)`: both end positions as likely as any other."""
    rng = random.Random(0)
    counts = collections.Counter(crop_box((70, 64), (64, 64), random_offset=(rng.random(), rng.random()))[0]
                                 for _ in range(7000))
    assert sorted(counts) == list(range(7)) and min(counts.values()) > 850 and max(counts.values()) < 1150


def test_wide_resolution_table_is_area_bound():
    table = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert all(w * h <= 768 * 512 for w, h in table)
    assert (int(math.sqrt(768 * 512)) // 64 * 64,) * 2 in table
