"""`DatasetReport`: what `check_dataset` found, per file and in total; JSON, Markdown and a one-screen summary."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .problems import KINDS


@dataclass
class Problem:
    kind: str
    path: str
    detail: str = ""

    @property
    def severity(self) -> str:
        return KINDS[self.kind].severity


@dataclass
class ImageRecord:
    """One file of the dataset. `width`/`height` are as displayed (after the EXIF rotation)."""

    path: str  # relative to the dataset root, '/'-separated
    size_bytes: int = 0
    readable: bool = False
    format: str | None = None
    mode: str | None = None
    bit_depth: int | None = None
    width: int | None = None
    height: int | None = None
    orientation: int = 1
    sha256: str = ""
    dhash: str | None = None  # 64-bit difference hash, hex
    caption: str | None = None
    caption_file: str | None = None
    caption_tokens: int | None = None
    bucket: tuple[int, int] | None = None
    duplicate_of: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def aspect(self) -> float | None:
        return self.width / self.height if self.width and self.height else None

    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bucket"] = list(self.bucket) if self.bucket else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ImageRecord:
        d = dict(d)
        d["problems"] = [Problem(**p) for p in d.get("problems", [])]
        d["bucket"] = tuple(d["bucket"]) if d.get("bucket") else None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DatasetReport:
    """The result of `check_dataset`.

    `records` has one entry per image-like file; `other_problems` holds problems of files that are not images
    (non-image files, orphan captions). `problems` groups everything by kind.
    """

    source: str
    resolution: int
    caption_extension: str
    token_counter: str  # "clip" (a real tokenizer) or "estimate"
    bucketing: str  # where the bucket assignment came from
    records: list[ImageRecord] = field(default_factory=list)
    other_problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    # ---------- views
    @property
    def problems(self) -> dict[str, list[Problem]]:
        """Problems by kind (only kinds that occur), in the catalogue's order."""
        out: dict[str, list[Problem]] = {}
        for p in self.all_problems():
            out.setdefault(p.kind, []).append(p)
        order = list(KINDS)
        return {k: out[k] for k in sorted(out, key=order.index)}

    def all_problems(self) -> list[Problem]:
        return [p for r in self.records for p in r.problems] + list(self.other_problems)

    def by_severity(self, severity: str) -> list[Problem]:
        return [p for p in self.all_problems() if p.severity == severity]

    @property
    def ok(self) -> bool:
        """No errors and no warnings (notes are allowed)."""
        return not any(p.severity in ("error", "warning") for p in self.all_problems())

    @property
    def n_images(self) -> int:
        return len(self.records)

    @property
    def trainable(self) -> list[ImageRecord]:
        return [r for r in self.records if r.readable]

    def record(self, path: str) -> ImageRecord:
        for r in self.records:
            if r.path == path:
                return r
        raise KeyError(path)

    def bucket_counts(self) -> Counter:
        return Counter(r.bucket for r in self.records if r.bucket)

    # ---------- text
    def summary(self) -> str:
        """A few lines: counts, then one line per problem kind with the fix."""
        n_ok = sum(1 for r in self.records if not r.problems)
        lines = [f"{self.source}: {self.n_images} images, {len(self.trainable)} readable, {n_ok} without problems "
                 f"(checked in {self.seconds:.1f} s; target {self.resolution}px)"]
        problems = self.problems
        if not self.records:
            from .sources import IMAGE_EXTENSIONS

            lines.append(f"No images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, sub-folders included).")
        if not problems:
            lines.append("No problems found.")
        for kind, items in problems.items():
            k = KINDS[kind]
            names = ", ".join(p.path for p in items[:3]) + (" ..." if len(items) > 3 else "")
            lines.append(f"  {k.severity:7s} {kind:17s} {len(items):4d}  {k.meaning}. Fix: {k.fix}.  [{names}]")
        buckets = self.bucket_counts()
        if buckets:
            lines.append("Buckets: " + ", ".join(f"{w}x{h}: {c}" for (w, h), c in sorted(buckets.items())))
        if self.token_counter == "estimate":
            lines.append("Caption lengths are estimated (no CLIP tokenizer given); set `tokenizer_model` for exact "
                         "counts.")
        return "\n".join(lines)

    def to_markdown(self, *, max_rows: int | None = None) -> str:
        """Summary table by problem kind, then the per-image table."""
        out = [f"### Dataset check: `{self.source}`", "",
               f"{self.n_images} images, {len(self.trainable)} readable, target resolution {self.resolution}px, "
               f"bucketing: {self.bucketing}, caption tokens: {self.token_counter}.", ""]
        problems = self.problems
        if problems:
            out += ["| severity | problem | files | meaning | fix |", "|---|---|---:|---|---|"]
            for kind, items in problems.items():
                k = KINDS[kind]
                out.append(f"| {k.severity} | {kind} | {len(items)} | {k.meaning} | {k.fix} |")
        else:
            out.append("**No problems found.**")
        out += ["", "| file | format | mode | size | bucket | caption tokens | problems |",
                "|---|---|---|---|---|---:|---|"]
        rows = self.records if max_rows is None else self.records[:max_rows]
        for r in rows:
            size = f"{r.width}x{r.height}" if r.width else ""
            bucket = f"{r.bucket[0]}x{r.bucket[1]}" if r.bucket else ""
            tokens = "" if r.caption_tokens is None else str(r.caption_tokens)
            probs = "; ".join(f"{p.kind}" + (f" ({p.detail})" if p.detail else "") for p in r.problems)
            out.append(f"| {_md(r.path)} | {r.format or ''} | {r.mode or ''} | {size} | {bucket} | {tokens} | "
                       f"{_md(probs)} |")
        if max_rows is not None and len(self.records) > max_rows:
            out.append(f"| ... {len(self.records) - max_rows} more | | | | | | |")
        for p in self.other_problems:
            out.append(f"| {_md(p.path)} | | | | | | {p.kind} |")
        return "\n".join(out)

    def _repr_markdown_(self) -> str:  # notebooks
        return self.to_markdown(max_rows=200)

    def __str__(self) -> str:
        return self.summary()

    def contact_sheet(self, **kwargs):
        """Thumbnails with problems marked (a PIL image); see `lorakit.dataprep.contact_sheet`."""
        from .contact_sheet import contact_sheet

        return contact_sheet(self, **kwargs)

    # ---------- JSON
    def to_dict(self) -> dict:
        return {
            "source": self.source, "resolution": self.resolution, "caption_extension": self.caption_extension,
            "token_counter": self.token_counter, "bucketing": self.bucketing, "seconds": self.seconds,
            "summary": {kind: len(items) for kind, items in self.problems.items()},
            "records": [r.to_dict() for r in self.records],
            "other_problems": [asdict(p) for p in self.other_problems],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetReport:
        return cls(source=d["source"], resolution=d["resolution"], caption_extension=d["caption_extension"],
                   token_counter=d["token_counter"], bucketing=d["bucketing"], seconds=d.get("seconds", 0.0),
                   records=[ImageRecord.from_dict(r) for r in d["records"]],
                   other_problems=[Problem(**p) for p in d.get("other_problems", [])])

    def save(self, dest: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        from ..fileio import write_text

        return write_text(dest, self.to_json() + "\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|")

