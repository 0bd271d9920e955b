"""`lorakit merge`: LoRAs into a model (`sd_model` given), or LoRAs into one LoRA (KOHYA_FORMAT.md §5).

Into a model, each target weight becomes `W + Σ ratio_i · scale_i · up_i @ down_i` (`lora_math.merge_weight`).
A single-file `.safetensors` base is streamed: read one tensor, add its deltas, write it, drop it — peak memory is
one tensor plus the LoRAs, not the 2–4 GB model (a `.ckpt` must be unpickled whole). A diffusers folder is merged
into a diffusers folder the same way. Outputs are written to a temporary name and renamed when complete, so a
failed merge leaves nothing behind.

Into one LoRA: `concat` (exact, rank = Σ ranks), `svd` (exact delta re-factorised to `new_rank`; also resizes a
single LoRA and reports its error) or `sum` (sd-scripts' approximate formula, same ranks only).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config.jobs import MergeConfig
from .errors import ConfigError, LoraFormatError, ModelLoadError
from .families import get_family
from .fileio import sync, temp_folder
from .formats import FAMILY_WORDS, component_of
from .lora_math import LoraFactors, concat_loras, merge_weight, rank_summary, sum_loras, svd_loras
from .model_weights import SINGLE_FILE_EXTENSIONS, FolderWeights, SingleFileWeights, kohya_name, open_weights
from .models import resolve_builtin
from .tensorstream import SafetensorsReader, write_safetensors

DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt")


@dataclass
class MergeResult:
    """What `merge` wrote: the output, how many modules were merged, and (svd mode) the relative errors."""

    path: Path
    modules: int
    mode: str  # "model" | "concat" | "svd" | "sum"
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # LoRA results: kohya module name -> its rank

    def __str__(self) -> str:
        err = "".join(f"; {c} relative error {e:.4f}" for c, e in self.errors.items())
        return f"{self.path}: {self.modules} modules merged ({self.mode}){err}"


# ------------------------------------------------------------------------------------------------- reading LoRAs
@dataclass
class LoadedLora:
    path: str
    modules: dict[str, LoraFactors]  # kohya module name -> factors
    family: str | None  # "sd1" | "sd2" | "sdxl" | None (unknown: tiny models without metadata)
    evidence: str
    metadata: dict[str, str]


def load_loras(paths: Sequence[str]) -> list[LoadedLora]:
    """Read and validate LoRA files; refuse mixes of model families (v1 with v2)."""
    from .formats import detect_family, load_lora_file, parse_kohya

    loaded = []
    for p in paths:
        path = Path(p)
        if path.suffix.lower() not in LORA_EXTENSIONS:
            raise ConfigError(f"`models`: {path.name} has an unknown extension; LoRA files end in "
                              f"{', '.join(LORA_EXTENSIONS)}")
        tensors, metadata = load_lora_file(path)
        weights = parse_kohya(tensors, where=path.name)
        family, evidence = detect_family(weights, metadata)
        modules = {name: LoraFactors(w.up, w.down, w.alpha) for name, w in weights.items()}
        loaded.append(LoadedLora(str(path), modules, family, evidence, metadata))
    known = [(lo.family, lo) for lo in loaded if lo.family]
    for family, lo in known:
        if family not in ("sd1", "sd2"):  # e.g. SDXL: its merged file would be labelled as an SD1 LoRA
            raise LoraFormatError(f"{Path(lo.path).name} is a LoRA for {FAMILY_WORDS.get(family, family)} "
                                  f"({lo.evidence}); lorakit merges LoRAs for SD 1.x and 2.x")
    if len({f for f, _ in known}) > 1:
        (fa, a), (fb, b) = known[0], next(x for x in known if x[0] != known[0][0])
        raise LoraFormatError(f"cannot merge LoRAs of different model families: {Path(a.path).name} is for "
                              f"{fa.upper()} ({a.evidence}) but {Path(b.path).name} is for {fb.upper()} ({b.evidence})")
    return loaded


def check_ratios(ratios: Sequence[float], what: str = "ratios") -> None:
    """Ratios outside [0, 1] are allowed (negative subtracts a LoRA) but usually a typo: warn."""
    for i, r in enumerate(ratios):
        if not math.isfinite(r):
            raise ConfigError(f"`{what}`[{i}] must be a finite number, got {r}")
        if r < 0 or r > 1:
            warnings.warn(f"`{what}`[{i}] = {r} is outside [0, 1]: allowed (negative subtracts the LoRA, above 1 "
                          f"exaggerates it), but check it is what you meant", UserWarning, stacklevel=3)


def deltas_by_param(loras: Sequence[LoadedLora], ratios: Sequence[float], shapes: dict[str, tuple[int, ...]],
                    family_name: str | None) -> dict[str, list[tuple[LoraFactors, float]]]:
    """Map each LoRA module onto the model parameter it changes: {diffusers weight name: [(factors, ratio)]}.

    Refuses a LoRA made for another family, a module that names no layer of the model, and shape mismatches.
    """
    by_kohya = {kohya_name(n): n for n in shapes if n.endswith(".weight") and n.startswith(("unet.", "text_encoder."))}
    out: dict[str, list[tuple[LoraFactors, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        name = Path(lora.path).name
        if lora.family and family_name and lora.family != family_name:
            raise LoraFormatError(f"{name} is a LoRA for {lora.family.upper()} ({lora.evidence}) but the model is "
                                  f"{family_name.upper()}; merge it into a {lora.family.upper()} model")
        missing = [m for m in lora.modules if m not in by_kohya]
        if missing:
            raise LoraFormatError(f"{name}: {len(missing)} of {len(lora.modules)} modules match no layer of the model "
                                  f"(e.g. {missing[0]}); is the LoRA for another model family or architecture?")
        for module, f in lora.modules.items():
            param = by_kohya[module]
            shape = shapes[param]
            if math.prod(f.weight_shape) != math.prod(shape) or f.weight_shape[0] != shape[0]:
                raise LoraFormatError(f"{name}: module {module} changes a {tuple(f.weight_shape)} weight but the "
                                      f"model's is {tuple(shape)}; is the LoRA for another model?")
            out.setdefault(param, []).append((f, ratio))
    return out


# -------------------------------------------------------------------------------------------------- output paths
def _check_output(save_to: str, inputs: Sequence[str], overwrite: bool, allow_folder: bool) -> Path:
    if not save_to:
        raise ConfigError("`save_to` is required for `merge`")
    out = Path(save_to)
    suffix = out.suffix.lower()
    if suffix and suffix not in SINGLE_FILE_EXTENSIONS[:3]:
        raise ConfigError(f"`save_to` {out.name}: unknown extension {suffix!r}; use .safetensors or .ckpt"
                          + (", or a folder name without extension (diffusers layout)" if allow_folder else ""))
    if not suffix and not allow_folder:
        raise ConfigError(f"`save_to` {out.name} needs an extension: .safetensors, .ckpt or .pt")
    if suffix and out.is_dir():
        raise ConfigError(f"`save_to` {out} is a folder; a merge into a file is not written over a folder: choose "
                          f"another name")
    target = out.resolve()
    for src in inputs:
        if not src or not Path(src).exists():
            continue
        source = Path(src).resolve()
        if source == target:
            raise ConfigError(f"`save_to` {out} is one of the inputs; refusing to write over an input file")
        if target in source.parents or (source.is_dir() and source in target.parents):
            raise ConfigError(f"`save_to` {out} {'holds' if target in source.parents else 'is inside'} the input "
                              f"{src}; write the merged model to a folder of its own")
    if out.exists() and not overwrite:
        raise ConfigError(f"`save_to` {out} exists; set `overwrite` to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ConfigError(f"`save_to` {out} is a folder that does not hold a diffusers model; a merge replaces the "
                          f"whole folder, so it is not written there (even with `overwrite`): choose a new folder name")
    return out


def merged_from(loras: Sequence[LoadedLora], base: str | None = None) -> str:
    """`modelspec.merged_from` as sd-scripts writes it: the titles of the inputs (a file's `modelspec.title`, else
    its name), the base model's first when merging into one."""
    titles = [lo.metadata.get("modelspec.title") or Path(lo.path).stem for lo in loras]
    return ", ".join(([base] if base else []) + titles)


class _AtomicFolder:
    """A temporary folder next to `dest`, moved onto `dest` on success and removed on failure."""

    def __init__(self, dest: Path):
        self.dest = dest

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_folder(self.dest)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dest.exists():  # the replaced folder moves aside (a name of its own) until the new one is in place
            aside = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.old.", dir=self.dest.parent))
            os.replace(self.dest, aside / self.dest.name)
            try:
                os.replace(self.tmp, self.dest)
            except BaseException:
                os.replace(aside / self.dest.name, self.dest)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            finally:
                if self.dest.exists():
                    shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        sync(self.dest.parent)
        return False


# ------------------------------------------------------------------------------------------------ into a model
def _out_dtype(t_dtype: torch.dtype, save_precision: str | None) -> torch.dtype:
    if save_precision is None or not t_dtype.is_floating_point:
        return t_dtype
    return DTYPES[save_precision]


def _merge_single_file(base: SingleFileWeights, plan, out: Path, dtype, save_precision, metadata,
                       device: str = "cpu") -> None:
    by_key: dict[str, list] = {}
    for param, mods in plan.items():
        where = base.where(param)
        by_key.setdefault(where.key, []).append((where.rows, mods))

    def produce(key: str) -> torch.Tensor:
        t = base.read_ldm(key)
        if key in by_key:
            original = t.dtype
            t = t.to(device, copy=not isinstance(base._reader, SafetensorsReader))
            for rows, mods in by_key[key]:
                if rows is None:
                    t = merge_weight(t, mods, dtype=dtype)
                else:
                    t[rows] = merge_weight(t[rows], mods, dtype=dtype)
            t = t.to("cpu", original)
        return t.to(_out_dtype(t.dtype, save_precision))

    from .fileio import atomic_path

    keys = list(base.ldm_shapes)
    if out.suffix.lower() == ".safetensors":
        layout = [(k, base.ldm_shapes[k], _out_dtype(base.ldm_dtype(k), save_precision)) for k in keys]
        with atomic_path(out) as tmp:
            write_safetensors(tmp, layout, produce, metadata)
    else:
        from .fileio import torch_save

        torch_save({"state_dict": {k: produce(k) for k in keys}, "global_step": 0, "epoch": 0, **(metadata or {})},
                   out)


def _merge_folder(base: FolderWeights, plan, out: Path, dtype, save_precision, device: str = "cpu") -> None:
    src = Path(base.source)
    with _AtomicFolder(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=_not_merged(src, base))
        for component, (reader, rename) in base._readers.items():
            inverse = {key: name for name, key in rename.items()}
            file = Path(reader.path)
            dest = tmp / component / file.name

            def produce(key, reader=reader, inverse=inverse):
                t = reader.get(key)
                mods = plan.get(inverse[key])
                if mods:
                    t = merge_weight(t.to(device), mods, dtype=dtype).cpu()
                return t.to(_out_dtype(t.dtype, save_precision))

            layout = [(k, reader.shape(k), _out_dtype(reader.dtype(k), save_precision)) for k in reader.keys()]
            write_safetensors(dest, layout, produce, reader.metadata or {"format": "pt"})


_WEIGHT_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")


def _not_merged(src: Path, base: FolderWeights):
    """`copytree`'s `ignore` for a merged diffusers folder: leave out what would hold the unmerged weights — the
    other weight files of the merged parts (fp16 variants, .bin twins: another loader would pick them), and
    weight files and folders beside the diffusers parts (a single-file checkpoint kept in the repo). The files
    being merged are written afresh; everything else (vae, tokenizer, scheduler, the model card) is copied."""
    import json

    merged = {Path(reader.path).resolve().parent: Path(reader.path).name for reader, _ in base._readers.values()}
    index = src / "model_index.json"
    parts = {k for k in json.loads(index.read_text(encoding="utf-8")) if not k.startswith("_")} \
        if index.is_file() else None

    def ignore(folder: str, names: list[str]) -> list[str]:
        here = Path(folder).resolve()
        if here in merged:
            return [n for n in names if n.lower().endswith(_WEIGHT_FILES) or n == merged[here]]
        if here == src.resolve():
            return [n for n in names if n.lower().endswith(_WEIGHT_FILES)
                    or (parts is not None and (here / n).is_dir() and n not in parts)]
        return []

    return ignore


def merge_into_components(comps, plan, dtype=torch.float32) -> None:
    """Add the planned deltas to in-memory components (weights change in place)."""
    from .model_weights import StateDictWeights

    weights = StateDictWeights.from_components(comps)
    with torch.no_grad():
        for param, mods in plan.items():
            w = weights.get(param)
            w.copy_(merge_weight(w, mods, dtype=dtype))


def _merge_into_model(cfg: MergeConfig, loras, ratios, out: Path) -> MergeResult:
    base = open_weights(cfg.sd_model, what="sd_model")
    try:
        family = get_family(cfg.v2) if cfg.v2 is not None else base.family
        plan = deltas_by_param(loras, ratios, base.shapes(), family.name)
        dtype = DTYPES[cfg.precision]
        streamable_file = isinstance(base, SingleFileWeights) and out.suffix
        streamable_folder = isinstance(base, FolderWeights) and not out.suffix and all(
            isinstance(r, SafetensorsReader) for r, _ in base._readers.values())
        if streamable_file:
            meta = dict(base._reader.metadata) if isinstance(base._reader, SafetensorsReader) else {}
            # the base's hashes describe the base's weights, not the merged ones
            meta = {k: v for k, v in meta.items() if not k.startswith(("sshs_", "modelspec.hash_"))}
            meta["lorakit.merged_loras"] = ", ".join(f"{Path(lo.path).name}:{r:g}" for lo, r in zip(loras, ratios))
            meta["modelspec.merged_from"] = merged_from(loras, base=meta.get("modelspec.title")
                                                        or Path(cfg.sd_model).stem)
            if "modelspec.title" in meta:  # the merged model is a model of its own name
                meta["modelspec.title"] = out.stem
            _merge_single_file(base, plan, out, dtype, cfg.save_precision, meta, cfg.device)
        elif streamable_folder:
            _merge_folder(base, plan, out, dtype, cfg.save_precision, cfg.device)
    finally:
        base.close()
    if not (streamable_file or streamable_folder):  # across layouts: load, merge in memory, save
        from .models import load_models

        comps = getattr(base, "components", None) or load_models(cfg.sd_model)
        merge_into_components(comps, plan, dtype)
        if out.suffix:
            from .models import save_single_file

            save_single_file(comps, out, save_precision=cfg.save_precision or "float")
        else:
            if cfg.save_precision:
                comps.to(dtype=DTYPES[cfg.save_precision])
            with _AtomicFolder(out) as tmp:
                comps.save_pretrained(tmp)
    return MergeResult(out, sum(len(m) for m in plan.values()), "model")


# -------------------------------------------------------------------------------------------------- LoRA + LoRA
def merge_lora_modules(loras: Sequence[LoadedLora], ratios: Sequence[float], mode: str, new_rank: int | None = None,
                       new_conv_rank: int | None = None, dynamic: tuple[str, float] | None = None
                       ) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    """Merge LoRAs module by module; returns ({module: factors}, svd mode: {component: relative error}). `dynamic`
    (svd mode): (method, target) of `lora_math.dynamic_rank`, the ranks then at most new_rank / new_conv_rank."""
    names = list(dict.fromkeys(n for lo in loras for n in lo.modules))
    merged: dict[str, LoraFactors] = {}
    sums: dict[str, list[float]] = {}
    for name in names:
        parts = [(lo.modules[name], r) for lo, r in zip(loras, ratios) if name in lo.modules]
        factors, rs = [p for p, _ in parts], [r for _, r in parts]
        try:
            if mode == "concat":
                merged[name] = concat_loras(factors, rs)
            elif mode == "sum":
                merged[name] = sum_loras(factors, rs)
            else:
                conv3 = factors[0].down.ndim == 4 and tuple(factors[0].down.shape[2:]) != (1, 1)
                rank = (new_conv_rank or new_rank) if conv3 else new_rank
                merged[name], err = svd_loras(factors, rs, rank, dynamic=dynamic)
                norm2 = float(sum(r * f.delta().flatten(1) for f, r in parts).square().sum())  # 2-D and 1x1 4-D alike
                acc = sums.setdefault(component_of(name), [0.0, 0.0])
                acc[0] += err * err * norm2
                acc[1] += norm2
        except ValueError as e:
            raise LoraFormatError(f"module {name}: {e}") from None
    errors = {c: math.sqrt(e / n) if n > 0 else 0.0 for c, (e, n) in sums.items()}
    return merged, errors


def _merge_loras(cfg: MergeConfig, loras, ratios, out: Path) -> MergeResult:
    from .formats import LoraWeights, save_lora
    from .lora_metadata import lora_base_metadata

    dynamic = (cfg.dynamic_method, cfg.dynamic_param) if cfg.dynamic_method else None
    merged, errors = merge_lora_modules(loras, ratios, cfg.merge_mode, cfg.new_rank, cfg.new_conv_rank, dynamic)
    for c, e in errors.items():
        component = "text encoder" if c == "text_encoder" else "U-Net"
        if dynamic:
            ranks = [f.rank for n, f in merged.items() if component_of(n) == c]
            print(f"{component}: {rank_summary(ranks, *dynamic)}; relative error of the result {e:.4f}")
        else:
            print(f"{component}: relative error of the rank-{cfg.new_rank} result {e:.4f}")
    # the family: `v2` when set, else the LoRAs' own (SD1 or SD2: load_loras refuses others); unknown for the tiny
    # test models, whose files are labelled SD1
    known = ("sd2" if cfg.v2 else "sd1") if cfg.v2 is not None else next((lo.family for lo in loras if lo.family),
                                                                           None)
    family = get_family(known or "sd1")
    first_meta = loras[0].metadata
    prediction = "v_prediction" if first_meta.get("ss_base_model_version", "").endswith("_v") else "epsilon"
    ranks = sorted({f.rank for f in merged.values()})
    linear = [f for f in merged.values() if not (f.down.ndim == 4 and f.down.shape[2] > 1)]
    conv = [f for f in merged.values() if f.down.ndim == 4 and f.down.shape[2] > 1]
    meta = lora_base_metadata(
        family, prediction, network_dim=max(f.rank for f in linear) if linear else ranks[-1],
        network_alpha=(linear[0].alpha if linear else None), title=out.stem, resolution=_resolution_of(first_meta),
        conv_dim=max(f.rank for f in conv) if conv else None, conv_alpha=conv[0].alpha if conv else None,
        extra={"lorakit.merged_loras": ", ".join(f"{Path(lo.path).name}:{r:g}" for lo, r in zip(loras, ratios)),
               "modelspec.merged_from": merged_from(loras),
               "lorakit.merge_mode": cfg.merge_mode,
               **({"lorakit.dynamic_rank": f"{cfg.dynamic_method}={cfg.dynamic_param:g}"} if dynamic else {}),
               **({"lorakit.merge_relative_error": {c: f"{e:.6f}" for c, e in errors.items()}} if errors else {})})
    save_dtype = cfg.save_precision or {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        next(iter(loras[0].modules.values())).up.dtype, "float")
    weights = {n: LoraWeights(down=f.down, up=f.up, alpha=float(f.alpha)) for n, f in merged.items()}
    for name, w in weights.items():  # 1x1 convolutions as 4-D tensors, as sd-scripts (its merge needs them so)
        if w.down.ndim == 2 and _is_conv_layer(name, known):
            weights[name] = LoraWeights(down=w.down[:, :, None, None], up=w.up[:, :, None, None], alpha=w.alpha)
    path = save_lora(out, weights, metadata=meta, save_precision=save_dtype)
    return MergeResult(path, len(merged), cfg.merge_mode, errors, {n: f.rank for n, f in merged.items()})


_CONV_LAYERS = re.compile(r"_(conv1|conv2|conv_shortcut|conv|conv_in|conv_out)$")  # Conv2d in every family


def _is_conv_layer(name: str, family: str | None) -> bool:
    """Whether a kohya module name is a convolution of the model (a LoRA may store a 1x1 one as 2-D tensors):
    the ResNets', samplers' and outer convolutions, and the transformers' `proj_in`/`proj_out` in SD1 (Linear in
    SD2; with the family unknown they keep the first LoRA's layout)."""
    return name.startswith("lora_unet_") and bool(
        _CONV_LAYERS.search(name) or (family == "sd1" and name.endswith(("_proj_in", "_proj_out"))))


def _resolution_of(metadata: dict) -> tuple[int, int] | None:
    """(width, height) a LoRA was trained at, from its `modelspec.resolution` ("512x512") or `ss_resolution`
    ("(512, 512)"); None when it has neither."""
    import re

    for key in ("modelspec.resolution", "ss_resolution"):
        numbers = re.findall(r"\d+", str(metadata.get(key, "")))
        if len(numbers) == 2:
            return int(numbers[0]), int(numbers[1])
    return None


# ------------------------------------------------------------------------------------------------------ the verb
def _is_repo_id(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.lower().endswith(SINGLE_FILE_EXTENSIONS)


def merge(cfg: MergeConfig | None = None, /, **kwargs) -> MergeResult:
    """Merge LoRA files into a model (`sd_model`) or into one LoRA (see `MergeConfig` for the options).

    `merge(sd_model="base.safetensors", models=["a.safetensors"], ratios=[0.8], save_to="merged.safetensors")`
    `merge(models=["a.safetensors", "b.safetensors"], merge_mode="svd", new_rank=32, save_to="ab.safetensors")`
    """
    cfg = MergeConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    cfg = cfg.replace(sd_model=resolve_builtin(cfg.sd_model))  # `lorakit-toy` -> its file
    if not cfg.models:
        raise ConfigError("`models` is empty: give at least one LoRA file")
    for m in cfg.models:
        if not Path(m).is_file():
            raise ConfigError(f"`models`: LoRA file not found: {m}")
    if cfg.sd_model is not None and not Path(cfg.sd_model).exists() and not _is_repo_id(cfg.sd_model):
        raise ModelLoadError(f"`sd_model` not found: {cfg.sd_model} (expected a single file, a diffusers folder or "
                             f"a Hub repo id)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` is cuda but no CUDA GPU is available; use `device = cpu`")
    ratios = cfg.resolved_ratios
    check_ratios(ratios)
    out = _check_output(cfg.save_to, [*cfg.models, cfg.sd_model or ""], cfg.overwrite,
                        allow_folder=cfg.sd_model is not None)
    loras = load_loras(cfg.models)
    result = _merge_into_model(cfg, loras, ratios, out) if cfg.sd_model else _merge_loras(cfg, loras, ratios, out)
    print(f"saved {result}")
    return result


__all__ = ["merge", "MergeResult", "load_loras", "deltas_by_param", "merge_into_components", "merge_lora_modules"]
