"""Caption files in bulk: trigger word first, replace / remove / dedupe tags, tag frequencies.

The tag edits are pure functions on one caption string; the folder functions apply them to every image's caption
file. Tags are the comma-separated parts of a caption; they match ignoring case, extra spaces and `_` vs ` `
(`long_hair` = `Long hair`). Edited captions go to a new folder (`output_dir`, images copied along) unless
`in_place=True` is given explicitly; every file is written atomically.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..data.captions import decode_caption, split_tags
from ..errors import ConfigError, DatasetError
from ..fileio import write_bytes, write_text
from .output import has_files
from .sources import IMAGE_EXTENSIONS, DatasetSource, stem_key


# ------------------------------------------------------------------ pure edits on one caption
def tag_key(tag: str) -> str:
    return " ".join(tag.replace("_", " ").split()).casefold()


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def with_trigger(caption: str, trigger: str) -> str:
    """`trigger` as the first tag(s) (moved there if elsewhere, added if missing); a trigger of several tags
    (`sks, style`) is added once however often this runs."""
    first = split_tags(trigger)
    keys = {tag_key(t) for t in first}
    return join_tags(first + [t for t in split_tags(caption) if tag_key(t) not in keys])


def with_replaced(caption: str, mapping: dict[str, str]) -> str:
    """Replace whole tags: {'old tag': 'new tag'}; an empty new tag removes it."""
    keyed = {tag_key(k): v.strip() for k, v in mapping.items()}
    out = [keyed.get(tag_key(t), t) for t in split_tags(caption)]
    return join_tags(t for t in out if t)


def without(caption: str, remove: Iterable[str]) -> str:
    """The caption without the tags in `remove` (an entry may list several: `long hair, blue eyes`)."""
    drop = {tag_key(t) for entry in remove for t in split_tags(entry)}
    return join_tags(t for t in split_tags(caption) if tag_key(t) not in drop)


def deduped(caption: str) -> str:
    """Each tag once, first occurrence kept."""
    seen, out = set(), []
    for t in split_tags(caption):
        if tag_key(t) not in seen:
            seen.add(tag_key(t))
            out.append(t)
    return join_tags(out)


def edit_caption(caption: str, *, trigger: str | None = None, replace: dict[str, str] | None = None,
                 remove: Iterable[str] | None = None, dedupe: bool = False) -> str:
    """All edits in a fixed order: replace, remove, dedupe, then the trigger first."""
    if replace:
        caption = with_replaced(caption, replace)
    if remove:
        caption = without(caption, remove)
    if dedupe:
        caption = deduped(caption)
    if trigger:
        caption = with_trigger(caption, trigger)
    return caption


# ------------------------------------------------------------------ folders
@dataclass
class CaptionEdit:
    """What a bulk caption edit did (paths relative to the dataset)."""

    output_dir: str
    changed: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> str:
        return (f"captions → {self.output_dir}: {len(self.changed)} changed, {len(self.created)} created, "
                f"{self.unchanged} unchanged")

    def __str__(self) -> str:
        return self.summary()


def _target(folder: Path, output_dir, in_place: bool) -> Path:
    if in_place:
        if output_dir is not None and Path(output_dir).resolve() != folder.resolve():
            raise DatasetError("give either `output_dir` or `in_place=True`, not both")
        if folder.is_file():
            raise DatasetError(f"{folder.name} is a zip: captions cannot be edited in place; give `output_dir`")
        return folder
    if output_dir is None:
        raise DatasetError("caption edits go to a new folder: give `output_dir` (or `in_place=True` to rewrite the "
                           f"caption files in {folder} itself)")
    out = Path(output_dir)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise DatasetError(f"`output_dir` ({out}) must be outside {folder}; or pass in_place=True")
    if has_files(out):
        raise DatasetError(f"`output_dir` {out} is not empty; choose a new folder (or set `replace_output = true` to "
                           f"replace an earlier prepare run's output)")
    return out


def map_captions(folder: str | os.PathLike, fn: Callable[[str | None, str], str | None], *,
                 output_dir: str | os.PathLike | None = None, in_place: bool = False,
                 caption_extension: str = ".txt") -> CaptionEdit:
    """Apply `fn(caption or None, image relative path) -> new caption or None (no file)` to every image.

    With `output_dir`, the whole dataset (images, other captions) is copied there with the new captions;
    with `in_place=True` only changed caption files are rewritten.
    """
    folder = Path(folder)
    out = _target(folder, output_dir, in_place)
    result = CaptionEdit(str(out))
    with DatasetSource(folder) as src:
        files = src.files()
        captions = {stem_key(rel): rel for rel, _ in files if rel.lower().endswith(caption_extension)}
        used, edited = set(), set()
        for rel, _ in files:
            if not rel.lower().endswith(IMAGE_EXTENSIONS):
                continue
            cap_rel = captions.get(stem_key(rel))
            dest_rel = cap_rel or str(PurePosixPath(rel).with_suffix(caption_extension))
            if dest_rel in edited:  # `a.png` and `a.jpg` share `a.txt`: it is edited once
                if not in_place:
                    write_bytes(out / rel, src.read(rel))
                continue
            edited.add(dest_rel)
            old = None
            if cap_rel is not None:
                used.add(cap_rel)
                old = decode_caption(src.read(cap_rel))[0]
                old = ", ".join(line.strip().rstrip(",") for line in old.splitlines() if line.strip())
            new = fn(old, rel)
            if not in_place:
                write_bytes(out / rel, src.read(rel))
            if new is None or new == old:
                result.unchanged += 1
                if not in_place and cap_rel is not None:
                    write_bytes(out / cap_rel, src.read(cap_rel))
                continue
            write_text(out / dest_rel, new + "\n")
            (result.changed if cap_rel is not None else result.created).append(dest_rel)
        if not in_place:  # everything else travels unchanged (orphan captions, metadata, other caption types)
            for rel, _ in files:
                if not rel.lower().endswith(IMAGE_EXTENSIONS) and rel not in used:
                    write_bytes(out / rel, src.read(rel))
    return result


def edit_captions(folder, *, output_dir=None, in_place: bool = False, trigger: str | None = None,
                  replace: dict[str, str] | None = None, remove: Iterable[str] | None = None, dedupe: bool = False,
                  create_missing: bool = True, caption_extension: str = ".txt") -> CaptionEdit:
    """Apply the tag edits to every caption; images without a caption get one with just the trigger
    (when `trigger` is given and `create_missing`)."""
    def fn(old, _rel):
        if old is None:
            return trigger.strip() if trigger and create_missing else None
        return edit_caption(old, trigger=trigger, replace=replace, remove=remove, dedupe=dedupe)

    return map_captions(folder, fn, output_dir=output_dir, in_place=in_place, caption_extension=caption_extension)


def add_trigger(folder, trigger: str, **kw) -> CaptionEdit:
    """Put `trigger` first in every caption (creating captions that are missing)."""
    if not trigger or not trigger.strip():
        raise ConfigError("`trigger` must be a non-empty word, e.g. 'sks'")
    return edit_captions(folder, trigger=trigger, **kw)


def replace_tags(folder, mapping: dict[str, str], **kw) -> CaptionEdit:
    return edit_captions(folder, replace=mapping, create_missing=False, **kw)


def remove_tags(folder, tags: Iterable[str], **kw) -> CaptionEdit:
    return edit_captions(folder, remove=list(tags), create_missing=False, **kw)


def dedupe_tags(folder, **kw) -> CaptionEdit:
    return edit_captions(folder, dedupe=True, create_missing=False, **kw)


def tag_frequencies(folder: str | os.PathLike, *, caption_extension: str = ".txt") -> Counter:
    """How many captions contain each tag (spelled as first seen), most common first via `.most_common()`."""
    counts: Counter = Counter()
    spelling: dict[str, str] = {}
    with DatasetSource(folder) as src:
        for rel, _ in src.files():
            if rel.lower().endswith(caption_extension):
                text = decode_caption(src.read(rel))[0]
                keys = {tag_key(t): t for t in split_tags(text.replace("\n", ","))}
                for k, t in keys.items():
                    counts[spelling.setdefault(k, t)] += 1
    return counts


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    """CLI form `["old=new", "bad="]` → {'old': 'new', 'bad': ''}."""
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise ConfigError(f"`replace_tags` entries must look like `old tag=new tag`, got {item!r}")
        out[old.strip()] = new.strip()
    return out
