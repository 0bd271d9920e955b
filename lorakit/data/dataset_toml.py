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

A value is looked up subset → dataset → `[general]` → the train config (CLI/TOML) → default. Relative `image_dir`s
are relative to the TOML file's folder. Unknown keys are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path

from ..config.schema import parse_resolution, read_toml
from ..errors import ConfigError
from .folders import DatasetSpec, Subset

SUBSET_KEYS = {"shuffle_caption", "caption_extension", "keep_tokens", "caption_dropout_rate", "color_aug",
               "flip_aug", "random_crop"}
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale"}
SUBSET_ONLY = {"image_dir", "num_repeats", "class_tokens", "is_reg", "metadata_file"}
# where the train config spells a value differently
CONFIG_NAMES = {"batch_size": "train_batch_size"}


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path.name}: unknown or unsupported key `{key}` in {where} "
                              f"(supported: {', '.join(sorted(allowed))})")


def load_dataset_config(path: str | Path, cfg, default_resolution: tuple[int, int]) -> list[DatasetSpec]:
    """Parse an sd-scripts dataset TOML into `DatasetSpec`s; `cfg` (TrainConfig) supplies the fallbacks."""
    path = Path(path)
    data = read_toml(path)
    _check_keys(data, {"general", "datasets"}, "the top level", path)
    general = data.get("general", {})
    _check_keys(general, SUBSET_KEYS | DATASET_KEYS, "[general]", path)
    datasets = data.get("datasets") or []
    if not datasets:
        raise ConfigError(f"{path.name}: no [[datasets]] table")

    def lookup(key, *tables):
        for t in tables:
            if key in t:
                return t[key]
        if key == "resolution":
            return None
        return getattr(cfg, CONFIG_NAMES.get(key, key))

    specs = []
    for i, ds in enumerate(datasets):
        _check_keys(ds, SUBSET_KEYS | DATASET_KEYS | {"subsets"}, f"[[datasets]] #{i + 1}", path)
        subsets = []
        for j, sub in enumerate(ds.get("subsets") or []):
            where = f"[[datasets.subsets]] #{j + 1} of dataset #{i + 1}"
            _check_keys(sub, SUBSET_KEYS | SUBSET_ONLY, where, path)
            if "image_dir" not in sub:
                raise ConfigError(f"{path.name}: {where} needs `image_dir`")
            image_dir = (path.parent / sub["image_dir"]).resolve()
            meta = sub.get("metadata_file")
            subsets.append(Subset(
                image_dir=image_dir, num_repeats=int(sub.get("num_repeats", 1)), is_reg=bool(sub.get("is_reg", False)),
                class_tokens=sub.get("class_tokens"),
                metadata_file=(path.parent / meta).resolve() if meta else None,
                **{k: lookup(k, sub, ds, general) for k in SUBSET_KEYS}))
        if not subsets:
            raise ConfigError(f"{path.name}: [[datasets]] #{i + 1} has no [[datasets.subsets]]")
        reso = lookup("resolution", ds, general)
        if isinstance(reso, list):
            reso = ",".join(str(r) for r in reso)
        resolution = parse_resolution(reso) or parse_resolution(cfg.resolution) or default_resolution
        specs.append(DatasetSpec(subsets=subsets, resolution=resolution,
                                 **{k: lookup(k, ds, general) for k in DATASET_KEYS - {"resolution"}}))
    return specs
