"""sd-scripts' dataset TOML (`dataset_config`), so users can bring the configs they already have.

    [general]
    shuffle_caption = true
    caption_extension = ".txt"
    [[datasets]]
    resolution = 512            # or [768, 512] (width, height)
    batch_size = 2
    enable_bucket = true
      [[datasets.subsets]]
      image_dir = "data/sks"
      class_tokens = "sks dog"
      num_repeats = 10
      [[datasets.subsets]]
      image_dir = "data/dogs"
      is_reg = true
      class_tokens = "dog"

A value is looked up subset → dataset → `[general]` → the train config (CLI/TOML) → default, with sd-scripts'
scopes: `image_dir`, `is_reg`, `metadata_file` and `conditioning_data_dir` (mask images, with `masked_loss`) belong
to a subset; `num_repeats`, `class_tokens`, `alpha_mask` and the caption and augmentation options may be set at any
level; the resolution, bucketing and batch options at dataset or `[general]` level. Every value is type- and
range-checked as the train option of the same name is. A relative `image_dir` (or `metadata_file`,
`conditioning_data_dir`) is looked up beside the TOML file, then in the working directory (sd-scripts looks in the
working directory only).
Unknown keys are errors that name the key; sd-scripts' keys that lorakit lacks are read while off and refused by name
when on, as in a train config.
"""

from __future__ import annotations

from pathlib import Path

from ..config.schema import (
    check_extension,
    checked_value,
    parse_resolution,
    read_toml,
    resolve_foreign_keys,
    scalar_spec,
)
from ..config.train import check_augmentations_uncached
from ..errors import ConfigError
from .folders import DatasetSpec, Subset

# options of the train config that a subset may set (or inherit from its dataset or [general])
SUBSET_OPTIONS = {"shuffle_caption", "caption_extension", "keep_tokens", "caption_dropout_rate", "color_aug",
                  "flip_aug", "random_crop", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                  "keep_tokens_separator", "caption_separator", "secondary_separator", "enable_wildcard",
                  "caption_prefix", "caption_suffix", "alpha_mask", "validation_split", "validation_seed",
                  "resize_interpolation"}
# subset values that are not train options, and may also be set at dataset or [general] level
SUBSET_ASCENDABLE = {"num_repeats": scalar_spec("num_repeats", int, 1, min=0),
                     "class_tokens": scalar_spec("class_tokens", str)}
SUBSET_KEYS = SUBSET_OPTIONS | set(SUBSET_ASCENDABLE)
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale"}
SUBSET_ONLY = {"image_dir": scalar_spec("image_dir", str), "is_reg": scalar_spec("is_reg", bool, False),
               "metadata_file": scalar_spec("metadata_file", str),
               "conditioning_data_dir": scalar_spec("conditioning_data_dir", str)}
# where the train config spells a value differently
CONFIG_NAMES = {"batch_size": "train_batch_size"}


# sd-scripts' dataset keys lorakit lacks, read while off (as the train config reads its own: `TrainConfig`'s tables)
DATASET_UNSUPPORTED = {"network_multiplier": ((1, 1.0), "a per-dataset LoRA multiplier"),
                       "custom_attributes": (({},), "custom attributes (for custom dataset classes)")}


def _foreign_left_out(table: dict, cfg, where: str, path: Path) -> dict:
    """`table` without the sd-scripts keys that lorakit lacks and that are off (noted), or that change nothing
    here (noted); one that is on is refused by name."""
    cls = type(cfg)
    return resolve_foreign_keys(table, SUBSET_KEYS | DATASET_KEYS | set(SUBSET_ONLY) | {"subsets"},
                                f" in {where} of {path.name}", aliases=cls.aliases, ignored=cls.ignored_options,
                                unsupported={**cls.unsupported_options, **DATASET_UNSUPPORTED})


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path.name}: unknown or unsupported key `{key}` in {where} "
                              f"(supported: {', '.join(sorted(allowed))})")


def _tables(value, what: str, path: Path) -> list[dict]:
    """An array of tables (`[[datasets]]`, `[[datasets.subsets]]`), refused by name when written otherwise."""
    if value is None:
        return []
    if not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
        raise ConfigError(f"{path.name}: `{what}` must be an array of tables, written [[{what}]]")
    return value


def _find(path: Path, value: str, key: str, where: str) -> Path:
    """A path from the TOML: as given when absolute; else beside the TOML file, then in the working directory."""
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [path.parent / given, Path.cwd() / given]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    looked = " or ".join(str(c.resolve()) for c in candidates)
    raise ConfigError(f"{path.name}: `{key}` {value!r} in {where} not found (looked for {looked})")


def load_dataset_config(path: str | Path, cfg, default_resolution: tuple[int, int]) -> list[DatasetSpec]:
    """Parse an sd-scripts dataset TOML into `DatasetSpec`s; `cfg` (TrainConfig) supplies the fallbacks."""
    path = Path(path)
    data = read_toml(path)
    _check_keys(data, {"general", "datasets"}, "the top level", path)
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError(f"{path.name}: `general` must be a table, written [general]")
    general = _foreign_left_out(general, cfg, "[general]", path)
    _check_keys(general, SUBSET_KEYS | DATASET_KEYS, "[general]", path)
    datasets = _tables(data.get("datasets"), "datasets", path)
    if not datasets:
        raise ConfigError(f"{path.name}: no [[datasets]] table")

    def lookup(key, *scopes):
        """The value of `key` from the first (table, where) scope that sets it, checked; else the train config's
        value (or the subset default)."""
        spec = SUBSET_ASCENDABLE.get(key) or SUBSET_ONLY.get(key)
        for table, where in scopes:
            if key in table:
                spec = spec or type(cfg).spec(CONFIG_NAMES.get(key, key))
                return checked_value(spec, table[key], f" (in {where} of {path.name})")
        return spec.default if spec else getattr(cfg, CONFIG_NAMES.get(key, key))

    specs = []
    for i, ds in enumerate(datasets):
        ds_where = f"[[datasets]] #{i + 1}"
        ds = _foreign_left_out(ds, cfg, ds_where, path)
        _check_keys(ds, SUBSET_KEYS | DATASET_KEYS | {"subsets"}, ds_where, path)
        subsets = []
        for j, sub in enumerate(_tables(ds.get("subsets"), "datasets.subsets", path)):
            where = f"[[datasets.subsets]] #{j + 1} of dataset #{i + 1}"
            sub = _foreign_left_out(sub, cfg, where, path)
            _check_keys(sub, SUBSET_KEYS | set(SUBSET_ONLY), where, path)
            scopes = ((sub, where), (ds, ds_where), (general, "[general]"))
            image_dir, meta = lookup("image_dir", scopes[0]), lookup("metadata_file", scopes[0])
            if image_dir is None and meta is None:
                raise ConfigError(f"{path.name}: {where} needs `image_dir` (or a `metadata_file`)")
            options = {k: lookup(k, *scopes) for k in SUBSET_KEYS}
            check_extension("caption_extension", options["caption_extension"], f" (in {where} of {path.name})")
            check_augmentations_uncached(cfg.cache_latents, options["color_aug"], options["random_crop"],
                                         file=path.name, where=where)
            meta_path = _find(path, meta, "metadata_file", where) if meta else None
            # without `image_dir`, the metadata file's keys are image paths (absolute, or beside the file)
            folder = _find(path, image_dir, "image_dir", where) if image_dir else meta_path.parent
            masks = lookup("conditioning_data_dir", scopes[0])
            if masks and not cfg.masked_loss:
                raise ConfigError(f"{path.name}: `conditioning_data_dir` in {where} holds the mask images of "
                                  f"`masked_loss`: set `masked_loss = true` to train with them")
            subsets.append(Subset(image_dir=folder, is_reg=lookup("is_reg", scopes[0]), metadata_file=meta_path,
                                  mask_dir=_find(path, masks, "conditioning_data_dir", where) if masks else None,
                                  **options))
        if not subsets:
            raise ConfigError(f"{path.name}: {ds_where} has no [[datasets.subsets]]")
        reso = next((t["resolution"] for t in (ds, general) if "resolution" in t), None)
        if isinstance(reso, list):
            reso = ",".join(str(r) for r in reso)
        resolution = parse_resolution(reso) or parse_resolution(cfg.resolution) or default_resolution
        options = {k: lookup(k, (ds, ds_where), (general, "[general]")) for k in DATASET_KEYS - {"resolution"}}
        if options["min_bucket_reso"] > options["max_bucket_reso"]:
            raise ConfigError(f"{path.name}: `min_bucket_reso` ({options['min_bucket_reso']}) must be ≤ "
                              f"`max_bucket_reso` ({options['max_bucket_reso']}) for {ds_where}")
        specs.append(DatasetSpec(subsets=subsets, resolution=resolution, **options))
    return specs
