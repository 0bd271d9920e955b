"""Prompt lines in kohya's syntax (KOHYA_FORMAT.md §9), used by `generate` and by sampling during training.

    a photo of sks dog --n lowres, blurry --w 512 --h 512 --s 28 --l 7.5 --d 42

`--n` negative prompt, `--w`/`--h` size (multiples of 8), `--s` steps, `--l` guidance (CFG) scale, `--d` seed,
`--ss` sampler (`euler_a`, `dpmsolver++`, … as `sample_sampler`).
Options not given fall back to the caller's defaults (`None` here). A prompt file holds one prompt per line; empty
lines and lines starting with `#` are skipped. sd-scripts' other prompt files are read too: `.toml` (a `[prompt]`
table of defaults and `[[prompt.subset]]` tables, one per prompt) and `.json` (a list of prompt lines or of tables),
with sd-scripts' keys `prompt`, `negative_prompt`, `width`, `height`, `sample_steps`, `scale`, `seed`,
`sample_sampler`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .config.schema import IMAGE_SIZE_MAX, SEED_MAX
from .errors import ConfigError
from .fileio import read_utf8

# option letter -> (field, converter, description)
_OPTIONS = {
    "n": ("negative_prompt", str, "negative prompt"),
    "w": ("width", int, "width"),
    "h": ("height", int, "height"),
    "s": ("num_inference_steps", int, "steps"),
    "l": ("guidance_scale", float, "guidance scale"),
    "d": ("seed", int, "seed"),
    "ss": ("sampler", str, "sampler"),
}
# sd-scripts' keys in .toml / .json prompt files -> PromptSpec fields
_TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
               "sample_steps": "num_inference_steps", "scale": "guidance_scale", "guidance_scale": "guidance_scale",
               "seed": "seed", "sample_sampler": "sampler"}
_LETTERS = {field: letter for letter, (field, _, _) in _OPTIONS.items()}
# ` --x value`: an option starts at a space (or the line start) followed by `--` and one known letter and a space
_SPLIT = re.compile(r"(?:^|\s)--([a-zA-Z]+)(?=\s|$)")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the generation settings its line overrides (`None`: use the job's setting)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None

    def with_defaults(self, **defaults) -> PromptSpec:
        """Fill the settings this line left unset from `defaults` (keys are the field names)."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_line(self) -> str:
        """The kohya prompt line for this spec (parse_prompt_line(spec.to_line()) == spec)."""
        parts = [self.prompt]
        for letter, (field, _, _) in _OPTIONS.items():
            value = getattr(self, field)
            if value is not None:
                parts.append(f"--{letter} {value}")
        return " ".join(parts)


def parse_prompt_line(line: str, where: str = "") -> PromptSpec:
    """Parse one kohya prompt line. Unknown options and bad values raise `ConfigError` naming them."""
    line = line.strip()
    matches = list(_SPLIT.finditer(line))
    prompt = line[: matches[0].start()].strip() if matches else line
    values: dict = {}
    for i, m in enumerate(matches):
        letter = m.group(1).lower()  # sd-scripts reads `--W 512` as `--w 512`
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        raw = line[m.end(): end].strip()
        if letter not in _OPTIONS:
            known = ", ".join(f"--{k} ({v[2]})" for k, v in _OPTIONS.items())
            raise ConfigError(f"unknown prompt option `--{letter}`{where}; known: {known}")
        field, conv, desc = _OPTIONS[letter]
        if not raw and field != "negative_prompt":
            raise ConfigError(f"prompt option `--{letter}` ({desc}) needs a value{where}")
        try:
            value = conv(raw)
        except ValueError:
            raise ConfigError(f"prompt option `--{letter}` ({desc}) must be {conv.__name__}, got {raw!r}{where}") \
                from None
        values[field] = _checked(field, value, f"prompt option `--{letter}` ({desc})", where)
    if not prompt:
        raise ConfigError(f"empty prompt{where}: a line must start with the prompt text")
    return _without_network_tags(PromptSpec(prompt=prompt, **values), where)


def _checked(field: str, value, name: str, where: str):
    """A prompt setting's value, range-checked (sizes multiples of 8, steps 1-1000, seed ≥ 0, guidance ≥ 1, a known
    sampler)."""
    if field in ("width", "height") and (value < 8 or value % 8 or value > IMAGE_SIZE_MAX):
        raise ConfigError(f"{name} must be a multiple of 8 up to {IMAGE_SIZE_MAX}, got {value}{where}")
    if field == "num_inference_steps" and not 1 <= value <= 1000:  # a sampler has at most the 1000 training steps
        raise ConfigError(f"{name} must be 1 to 1000, got {value}{where}")
    if field == "seed" and not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name} must be 0 to {SEED_MAX} (2^32 − 1), got {value}{where}")
    if field == "guidance_scale" and not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"{name} must be ≥ 1 (1: no guidance, the negative prompt unused), got {value:g}{where}")
    return _sampler_name(value, where) if field == "sampler" else value


def prompt_from_table(table: dict, where: str = "") -> PromptSpec:
    """One prompt of an sd-scripts .toml / .json prompt file (`{"prompt": ..., "width": 512, "scale": 7, ...}`)."""
    unknown = [k for k in table if k not in _TABLE_KEYS and k != "enum"]
    if unknown:
        raise ConfigError(f"unknown prompt key `{unknown[0]}`{where}; known: {', '.join(_TABLE_KEYS)}")
    values = {}
    for key, value in table.items():
        if key == "enum" or (key == "guidance_scale" and "scale" in table):
            continue  # sd-scripts' own numbering of the prompts; its FLUX guidance beside the CFG `scale`
        field = _TABLE_KEYS[key]
        kind = str if field in ("prompt", "negative_prompt", "sampler") else _OPTIONS[_LETTERS[field]][1]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not kind:
            raise ConfigError(f"prompt key `{key}` must be {'a string' if kind is str else kind.__name__}, got "
                              f"{value!r}{where}")
        values[field] = value if field in ("prompt", "negative_prompt") else _checked(
            field, value, f"prompt key `{key}`", where)
    if not str(values.get("prompt", "")).strip():
        raise ConfigError(f"a prompt{where} has no `prompt` text")
    values["prompt"] = values["prompt"].strip()
    return _without_network_tags(PromptSpec(**values), where)


# A1111's `<lora:name:weight>` (and LyCORIS' `<lyco:…>`, hypernetworks') tags: UI syntax that loads a file by name
_NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^>]*))?>", re.IGNORECASE)


def _without_network_tags(spec: PromptSpec, where: str) -> PromptSpec:
    """`spec`, refused when its prompt holds A1111 syntax lorakit does not have and would read as words: LoRA tags
    (the CLIP tokens of `<lora:name:0.8>`, not the LoRA), prompt editing and alternation."""
    for text in (spec.prompt, spec.negative_prompt or ""):
        if m := _NETWORK_TAG.search(text):
            weight = f" and `--network_mul {m[3]}`" if m[3] else ""
            raise ConfigError(f"`{m[0]}` in the prompt{where} is A1111's syntax for loading a network by name; "
                              f"lorakit would read it as words. Remove it and give the file with `--network_weights "
                              f"{m[2]}.safetensors`{weight} (generate; a training run samples with its own LoRA)")
        if m := _EDITING.search(text):
            raise ConfigError(f"`{m[0]}` in the prompt{where} is A1111's prompt editing or alternation (the text "
                              f"changes during sampling), which lorakit does not do: it would be read as "
                              f"de-emphasised words. Write the prompt it should be")
    return spec


# A1111's prompt editing `[from:to:when]` / `[to:when]` / `[from::when]` and alternation `[a|b]` (escaped brackets
# `\[` are text): lorakit's emphasis would read them as `[...]`, weight 1/1.1, colons and bars as words
_EDITING = re.compile(r"(?<!\\)\[(?:[^\[\]]*:\s*[\d.]+\s*|[^\[\]|]*\|[^\[\]]*)(?<!\\)\]")


def _tables_of(path: Path) -> list:
    """The entries of an sd-scripts .toml or .json prompt file: tables, or (JSON) prompt lines."""
    text = read_utf8(path, "prompt file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"prompt file {path.name}: invalid JSON ({e})") from None
        if not isinstance(data, list):
            raise ConfigError(f"prompt file {path.name} must hold a list of prompts (lines or tables)")
        return data
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"prompt file {path.name}: invalid TOML ({e})") from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise ConfigError(f"prompt file {path.name} has no [prompt] table (sd-scripts' layout: [prompt] with "
                          f"defaults, then one [[prompt.subset]] per prompt)")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset", [])
    if not (isinstance(subsets, list) and all(isinstance(sub, dict) for sub in subsets)):
        raise ConfigError(f"prompt file {path.name}: `subset` must be a list of tables, one per prompt "
                          f"([[prompt.subset]] with prompt = \"...\"), got {subsets!r}")
    return [{**defaults, **sub} for sub in subsets] if subsets else [defaults]


def _sampler_name(name: str, where: str) -> str:
    """A `--ss` value as `sample_sampler` reads it (its choices, any case, sd-scripts' aliases)."""
    from dataclasses import replace

    from .config.schema import checked_value
    from .config.train import TrainConfig

    return checked_value(replace(TrainConfig.spec_map()["sample_sampler"], name="--ss"), name, where)


def parse_prompt_text(text: str, source: str = "") -> list[PromptSpec]:
    """Parse the lines of a prompt file's text (blank lines and `#` comments skipped)."""
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        specs.append(parse_prompt_line(line, where=f" (line {number}{' of ' + source if source else ''})"))
    return specs


def read_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Read a kohya prompt file: one prompt per line (.txt and any other name), or sd-scripts' .toml / .json."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    if path.suffix.lower() in (".toml", ".json"):
        specs = []
        for number, entry in enumerate(_tables_of(path), start=1):
            where = f" (prompt {number} of {path.name})"
            if isinstance(entry, str):
                specs.append(parse_prompt_line(entry, where))
            elif isinstance(entry, dict):
                specs.append(prompt_from_table(entry, where))
            else:
                raise ConfigError(f"prompt {number} of {path.name} must be a prompt line or a table, got {entry!r}")
    else:
        specs = parse_prompt_text(read_utf8(path, "prompt file"), source=path.name)
    if not specs:
        raise ConfigError(f"prompt file {path} has no prompts")
    return specs
