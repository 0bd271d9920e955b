"""A model's U-Net and text-encoder weights, read one tensor at a time by diffusers name, from any layout.

Merge and extract touch only the LoRA target layers, so they need neither the whole model in memory nor its
Python modules: `open_weights(path)` gives a `ModelWeights` that lists the target parameters (diffusers names with
their component prefix, classic text-encoder spelling: `unet.down_blocks.0.attentions.0.proj_in.weight`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight`) and reads any of them on demand:

- a diffusers folder: `unet/` and `text_encoder/` safetensors (or .bin) files, read tensor by tensor;
- a single-file LDM checkpoint: `.safetensors` streamed, `.ckpt` loaded whole (weights only). Keys are mapped with
  `checkpoint_keys.ldm_key_for`; the architecture facts that mapping needs are read from the file's own keys;
- `SDComponents` already in memory.

`target_modules` decides which parameters get a LoRA, as sd-scripts does (KOHYA_FORMAT.md §3), from names and
shapes alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_keys import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_FIXED,
    UNET_PREFIX,
    LdmKey,
    LdmLayout,
    ldm_key_for,
)
from .errors import ModelLoadError
from .families import SD1, SD2, Family
from .tensorstream import SafetensorsReader

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# ----------------------------------------------------------------------------------------------- target selection
_UNET_ATTN = re.compile(r"unet\.(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\..+\.weight")
_UNET_CONV = re.compile(r"unet\.(down_blocks\.\d+|up_blocks\.\d+|mid_block)\."
                        r"(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(down|up)samplers\.0\.conv)\.weight")
_TE = re.compile(r"text_encoder\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight")


@dataclass(frozen=True)
class Target:
    """One LoRA target layer: its weight's diffusers name, kohya module name, shape and which rank it gets."""

    param: str
    kohya: str
    shape: tuple[int, ...]
    component: str  # "unet" | "text_encoder"
    conv3x3: bool  # ranked with `conv_dim` instead of `dim`


def kohya_name(param: str) -> str:
    """`unet.a.b.weight` -> `lora_unet_a_b`; `text_encoder.text_model.x.weight` -> `lora_te_text_model_x`."""
    component, _, rest = param.removesuffix(".weight").partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    return prefix + rest.replace(".", "_")


def target_modules(shapes: dict[str, tuple[int, ...]], *, conv: bool = False) -> list[Target]:
    """The LoRA targets among `shapes` (diffusers name -> shape), in a stable order.

    U-Net: every Linear / 1x1 conv inside the transformer blocks (attentions), i.e. q/k/v/out, feed-forward,
    proj_in/proj_out. With `conv` (LoCon): also the resnets' 3x3 convs, down/upsampler convs (rank `conv_dim`) and
    the resnets' time_emb_proj and 1x1 conv_shortcut (rank `dim`), as sd-scripts. Text encoder: q/k/v/out, fc1/fc2.
    """
    out = []
    for name, shape in shapes.items():
        is_kernel = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        if len(shape) not in (2, 4):
            continue
        if _TE.fullmatch(name):
            out.append(Target(name, kohya_name(name), tuple(shape), "text_encoder", False))
        elif _UNET_ATTN.fullmatch(name) and not is_kernel:
            out.append(Target(name, kohya_name(name), tuple(shape), "unet", False))
        elif conv and _UNET_CONV.fullmatch(name):
            out.append(Target(name, kohya_name(name), tuple(shape), "unet", is_kernel))
    return out


# --------------------------------------------------------------------------------------- LDM keys -> diffusers names
_RESNET_BACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_OPENCLIP_BACK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def _resnet_back(rest: str) -> str | None:
    for ldm, name in _RESNET_BACK.items():
        if rest.startswith(ldm + "."):
            return name + rest[len(ldm):]
    return None


def layout_from_ldm_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[LdmLayout, Family]:
    """The architecture facts of a single-file checkpoint, read from its keys and shapes."""
    keys = list(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelLoadError("not a Stable Diffusion checkpoint: no `model.diffusion_model.*` keys")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError("this is an SDXL checkpoint (conditioner.embedders.* keys); lorakit supports SD1.x/SD2.x")
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in keys)
    if openclip:
        hidden = shapes[OPENCLIP_PREFIX + "token_embedding.weight"][1]
        pattern = re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\."
        blocks = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
        # SD2 uses the penultimate OpenCLIP layer: diffusers drops the tower's last block, which the original files
        # keep (with `text_projection`); a file converted back from diffusers has only the blocks in use
        te_layers = len(blocks) - 1 if OPENCLIP_PREFIX + "text_projection" in shapes else len(blocks)
    else:
        embedding = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
        if embedding not in shapes:
            raise ModelLoadError(f"no text encoder in this checkpoint (no `{embedding}` nor OpenCLIP keys): merge and "
                                 f"extract need a full SD1.x/SD2.x single file (U-Net, text encoder and VAE)")
        hidden = shapes[embedding][1]
        te_layers = len({int(m[1]) for k in keys
                         if (m := re.match(re.escape(CLIP_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\.", k))})
    inputs = {int(m[1]) for k in keys if (m := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.", k))}
    op = re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\."
    ops = sorted(int(m[1]) for k in keys if (m := re.match(op, k)))
    n = ops[0] - 1 if ops else max(inputs)
    n_down = (max(inputs) - 1) // (n + 1) + 1
    has_attn = [any(k.startswith(f"{UNET_PREFIX}input_blocks.{1 + i * (n + 1)}.1.") for k in keys)
                for i in range(n_down)]
    up_attn = [any(k.startswith(f"{UNET_PREFIX}output_blocks.{i * (n + 1)}.1.proj_in.") for k in keys)
               for i in range(n_down)]
    vae_blocks = len({int(m[1]) for k in keys if (m := re.match(r"first_stage_model\.encoder\.down\.(\d+)\.", k))})
    layout = LdmLayout(layers_per_block=n, down_has_attention=tuple(has_attn), up_has_attention=tuple(up_attn),
                       vae_blocks=vae_blocks, te_layout="openclip" if openclip else "clip", te_hidden_size=hidden,
                       te_layers=te_layers)
    return layout, SD2 if openclip else SD1


def diffusers_names_for_ldm(key: str, layout: LdmLayout) -> list[str]:
    """The U-Net / text-encoder diffusers parameter(s) stored under an LDM key ([] for VAE and unmapped keys).

    SD2's stacked `in_proj_weight` holds three parameters (q, k, v). Each answer is checked against the forward
    mapping `ldm_key_for`, so the two directions cannot drift apart.
    """
    n = layout.layers_per_block
    names: list[str] = []
    if key.startswith(UNET_PREFIX):
        k = key[len(UNET_PREFIX):]
        fixed = [src + k[len(dst):] for src, dst in UNET_FIXED.items() if k.startswith(dst)]
        if fixed:
            names = ["unet." + fixed[0]]
        elif m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", k):
            i, j = divmod(int(m[1]) - 1, n + 1)
            if j < n:
                rest = _resnet_back(m[3]) if m[2] == "0" else m[3]
                kind = "resnets" if m[2] == "0" else "attentions"
                names = [f"unet.down_blocks.{i}.{kind}.{j}.{rest}"] if rest else []
            elif m[3].startswith("op."):
                names = [f"unet.down_blocks.{i}.downsamplers.0.conv.{m[3][3:]}"]
        elif m := re.fullmatch(r"middle_block\.([012])\.(.+)", k):
            rest = m[2] if m[1] == "1" else _resnet_back(m[2])
            names = [f"unet.mid_block.attentions.0.{rest}" if m[1] == "1"
                     else f"unet.mid_block.resnets.{int(m[1]) // 2}.{rest}"] if rest else []
        elif m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", k):
            i, j = divmod(int(m[1]), n + 1)
            if m[3].startswith("conv.") and m[2] != "0":
                names = [f"unet.up_blocks.{i}.upsamplers.0.{m[3]}"]
            elif m[2] == "0":
                rest = _resnet_back(m[3])
                names = [f"unet.up_blocks.{i}.resnets.{j}.{rest}"] if rest else []
            elif m[2] == "1":
                names = [f"unet.up_blocks.{i}.attentions.{j}.{m[3]}"]
    elif layout.te_layout == "clip" and key.startswith(CLIP_PREFIX + "text_model."):
        names = ["text_encoder." + key[len(CLIP_PREFIX):]]
    elif key.startswith(OPENCLIP_PREFIX + "transformer.resblocks."):
        rest = key[len(OPENCLIP_PREFIX + "transformer.resblocks."):]
        if int(rest.partition(".")[0]) >= layout.te_layers:  # the last block, which diffusers drops
            return []
        if m := re.fullmatch(r"(\d+)\.attn\.in_proj_(weight|bias)", rest):
            names = [f"text_encoder.text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}" for p in "qkv"]
        elif m := re.fullmatch(r"(\d+)\.(.+)\.(weight|bias)", rest):
            if m[2] in _OPENCLIP_BACK:
                names = [f"text_encoder.text_model.encoder.layers.{m[1]}.{_OPENCLIP_BACK[m[2]]}.{m[3]}"]
    checked = []
    for name in names:
        try:
            if ldm_key_for(name, layout).key == key:
                checked.append(name)
        except KeyError:
            pass
    return checked


# ------------------------------------------------------------------------------------------------------- sources
class ModelWeights:
    """Read-only access to a model's U-Net and text-encoder parameters by diffusers name."""

    family: Family
    source: str

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction": what the model predicts (for the metadata of LoRAs made from it)."""
        return "epsilon"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, conv: bool = False) -> list[Target]:
        return target_modules(self.shapes(), conv=conv)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _te_name(key: str) -> str:
    """Text-encoder state-dict key in the classic spelling (transformers ≥ 5 drops `text_model.`)."""
    return "text_encoder." + (key if key.startswith("text_model.") else "text_model." + key)


class StateDictWeights(ModelWeights):
    """Weights already in memory: `SDComponents` or a flat {diffusers name: tensor} dict."""

    def __init__(self, tensors: dict[str, torch.Tensor], family: Family, source: str = "memory"):
        self.tensors, self.family, self.source = tensors, family, source
        self.components = None  # the SDComponents the tensors belong to, when built from them

    @classmethod
    def from_components(cls, comps) -> StateDictWeights:
        tensors = {"unet." + k: v for k, v in comps.unet.state_dict().items()}
        tensors.update({_te_name(k): v for k, v in comps.text_encoder.state_dict().items()})
        weights = cls(tensors, comps.family, comps.source or "memory")
        weights.components = comps
        return weights

    @property
    def prediction_type(self) -> str:
        return self.components.prediction_type if self.components is not None else "epsilon"

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def get(self, name):
        return self.tensors[name]


class FolderWeights(ModelWeights):
    """A diffusers folder: the U-Net and text-encoder weight files, read tensor by tensor."""

    def __init__(self, folder: Path):
        self.source = str(folder)
        self._readers: dict[str, tuple[object, dict[str, str]]] = {}
        for component, stems in (("unet", ("diffusion_pytorch_model",)), ("text_encoder", ("model",))):
            sub = folder / component
            files = [sub / f"{s}.safetensors" for s in stems] + [sub / f"{s}.bin" for s in stems]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                raise ModelLoadError(f"{folder}: no weights in {component}/ (expected {files[0].name}); sharded "
                                     f"or variant files are not supported here — save the model unsharded")
            if found.suffix == ".safetensors":
                reader = SafetensorsReader(found)
                keys = reader.keys()
            else:
                from .fileio import safe_torch_load

                reader = safe_torch_load(found)
                keys = list(reader)
            rename = {("unet." + k if component == "unet" else _te_name(k)): k for k in keys}
            self._readers[component] = (reader, rename)
        unet_cfg = folder / "unet" / "config.json"
        import json

        cfg = json.loads(unet_cfg.read_text()) if unet_cfg.is_file() else {}
        v2 = cfg.get("cross_attention_dim") == 1024 or bool(cfg.get("use_linear_projection"))
        self.family = SD2 if v2 else SD1
        scheduler = folder / "scheduler" / "scheduler_config.json"
        self._prediction = (json.loads(scheduler.read_text()).get("prediction_type") if scheduler.is_file()
                            else None) or "epsilon"

    @property
    def prediction_type(self) -> str:
        return self._prediction

    def _locate(self, name):
        component = name.partition(".")[0]
        reader, rename = self._readers[component]
        return reader, rename[name]

    def shapes(self):
        out = {}
        for reader, rename in self._readers.values():
            for name, key in rename.items():
                out[name] = reader.shape(key) if isinstance(reader, SafetensorsReader) else tuple(reader[key].shape)
        return out

    def get(self, name):
        reader, key = self._locate(name)
        return reader.get(key) if isinstance(reader, SafetensorsReader) else reader[key]

    def close(self):
        for reader, _ in self._readers.values():
            if isinstance(reader, SafetensorsReader):
                reader.close()


class SingleFileWeights(ModelWeights):
    """A single-file LDM checkpoint (.safetensors streamed; .ckpt loaded whole with weights_only)."""

    def __init__(self, path: Path):
        self.source = str(path)
        if path.suffix.lower() == ".safetensors":
            self._reader = SafetensorsReader(path)
            ldm_shapes = {k: self._reader.shape(k) for k in self._reader.keys()}
        else:
            from .fileio import safe_torch_load

            sd = safe_torch_load(path, mmap=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            if not isinstance(sd, dict):
                raise ModelLoadError(f"{path.name}: not a state dict")
            self._reader = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            ldm_shapes = {k: tuple(v.shape) for k, v in self._reader.items()}
        from .checkpoint import normalize_ldm_keys

        # older SD1 files spell the CLIP keys without `text_model.`: read them under the usual names
        originals = normalize_ldm_keys({k: k for k in ldm_shapes})  # usual name -> the file's
        self._original = {name: key for name, key in originals.items() if name != key}
        ldm_shapes = {name: ldm_shapes[key] for name, key in originals.items()}
        self.ldm_shapes = ldm_shapes
        self.layout, self.family = layout_from_ldm_keys(ldm_shapes)
        self._where: dict[str, LdmKey] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key, shape in ldm_shapes.items():
            for name in diffusers_names_for_ldm(key, self.layout):
                where = ldm_key_for(name, self.layout)
                self._where[name] = where
                self._shapes[name] = (len(range(*where.rows.indices(shape[0]))), *shape[1:]) if where.rows \
                    else shape

    def where(self, name: str) -> LdmKey:
        """The LDM key (and rows) holding a diffusers parameter."""
        return self._where[name]

    def read_ldm(self, key: str) -> torch.Tensor:
        key = self._original.get(key, key)
        return self._reader.get(key) if isinstance(self._reader, SafetensorsReader) else self._reader[key]

    @property
    def prediction_type(self) -> str:
        """Detected as the loader does (`checkpoint.detect_prediction_type`), reading only the tensors it needs."""
        from collections.abc import Mapping

        from .checkpoint import detect_prediction_type

        weights = self

        class Lazy(Mapping):
            def __getitem__(self, key):
                if key not in weights.ldm_shapes:
                    raise KeyError(key)
                return weights.read_ldm(key)

            def __iter__(self):
                return iter(weights.ldm_shapes)

            def __len__(self):
                return len(weights.ldm_shapes)

        metadata = self._reader.metadata if isinstance(self._reader, SafetensorsReader) else {}
        return detect_prediction_type(Lazy(), self.family, metadata=metadata)

    def ldm_dtype(self, key: str) -> torch.dtype:
        key = self._original.get(key, key)
        return self._reader.dtype(key) if isinstance(self._reader, SafetensorsReader) else self._reader[key].dtype

    def shapes(self):
        return dict(self._shapes)

    def get(self, name):
        where = self._where[name]
        t = self.read_ldm(where.key)
        return t[where.rows] if where.rows is not None else t

    def close(self):
        if isinstance(self._reader, SafetensorsReader):
            self._reader.close()


def open_weights(model, *, what: str = "model") -> ModelWeights:
    """A `ModelWeights` for a path (diffusers folder or single file), `SDComponents`, or a Hub repo id."""
    if isinstance(model, ModelWeights):
        return model
    if hasattr(model, "unet") and hasattr(model, "text_encoder"):
        return StateDictWeights.from_components(model)
    path = Path(os.fspath(model))
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelLoadError(f"`{what}` {path}: folder has no model_index.json — not a diffusers model folder")
        return FolderWeights(path)
    if path.suffix.lower() in SINGLE_FILE_EXTENSIONS:
        if not path.is_file():
            raise ModelLoadError(f"`{what}`: file not found: {path}")
        return SingleFileWeights(path)
    if path.exists():
        raise ModelLoadError(f"`{what}` {path}: unknown extension {path.suffix!r}; expected a diffusers folder or "
                             f"one of {', '.join(SINGLE_FILE_EXTENSIONS)}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):  # a Hub repo id: load it through the loader (downloads)
        from .models import load_models

        return StateDictWeights.from_components(load_models(str(model)))
    raise ModelLoadError(f"`{what}` not found: {model} (expected a diffusers folder, a single file or a Hub repo id)")
