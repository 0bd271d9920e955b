"""Names: diffusers parameter name <-> key in a single-file Stable Diffusion checkpoint (the original LDM layout).

A single-file SD1.x/SD2.x checkpoint (what A1111, ComfyUI and sd-scripts read) stores all three networks in one
state dict, under the names of the original latent-diffusion code:

- U-Net: `model.diffusion_model.*` — `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, `time_embed`, `out`;
- VAE: `first_stage_model.*` — `encoder.down.I.block.J`, `decoder.up.I.block.J` (reverse order), `mid.attn_1`;
- text encoder, SD1: `cond_stage_model.transformer.text_model.*` (the Hugging Face CLIP names, one to one);
- text encoder, SD2: `cond_stage_model.model.*`, the OpenCLIP layout — `transformer.resblocks.N.attn.in_proj_weight`
  holds q, k and v stacked along the rows; `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `token_embedding`,
  `positional_embedding`, `ln_final`, plus `text_projection` and `logit_scale`, which SD2 does not use.

Every rule is derived from the diffusers configs (number of blocks, `layers_per_block`, which blocks have attention,
hidden size), so one code path names the full-size models and the tiny test models alike. Diffusers parameter
names are written with their component prefix and the classic text-encoder spelling, `text_encoder.text_model.…`
(transformers >= 5 dropped the `text_model.` level from `CLIPTextModel`; the interchange names kept it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .families import SD1, SD2, Family

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model.…
OPENCLIP_PREFIX = "cond_stage_model.model."
COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass(frozen=True)
class LdmKey:
    """Where a diffusers parameter lives in a single-file checkpoint.

    `key`: the LDM key. `rows`: for SD2's stacked q/k/v (`attn.in_proj_weight` / `in_proj_bias`), the rows of that
    tensor holding this parameter (q = first third, k = second, v = last); None when the tensor is the parameter.
    `conv1x1`: the LDM tensor is a 1x1 convolution `[out, in, 1, 1]` while the diffusers parameter is a Linear
    weight `[out, in]` (VAE mid-block attention q/k/v/proj_out) — reshape, values are identical.
    """

    key: str
    rows: slice | None = None
    conv1x1: bool = False


@dataclass(frozen=True)
class LdmLayout:
    """The architecture facts the key mapping needs, read from the diffusers configs."""

    layers_per_block: int  # U-Net resnets per down block (up blocks have one more)
    down_has_attention: tuple[bool, ...]
    up_has_attention: tuple[bool, ...]
    vae_blocks: int
    te_layout: str  # "clip" (SD1) | "openclip" (SD2)
    te_hidden_size: int
    te_layers: int  # layers of the diffusers text encoder (SD2: one fewer than the OpenCLIP tower in the file)

    @classmethod
    def from_configs(cls, configs: dict, family: Family | None = None) -> LdmLayout:
        """`configs`: {"unet": {...}, "vae": {...}, "text_encoder": {...}} as in a diffusers folder's config files."""
        unet, vae, te = configs["unet"], configs["vae"], configs["text_encoder"]
        lpb = unet["layers_per_block"]
        if not isinstance(lpb, int):
            raise ValueError(f"unet `layers_per_block` must be one int for the LDM layout, got {lpb!r}")
        family = family or family_from_configs(configs)
        return cls(
            layers_per_block=lpb,
            down_has_attention=tuple("CrossAttn" in t for t in unet["down_block_types"]),
            up_has_attention=tuple("CrossAttn" in t for t in unet["up_block_types"]),
            vae_blocks=len(vae["block_out_channels"]),
            te_layout=family.te_layout,
            te_hidden_size=int(te["hidden_size"]),
            te_layers=int(te["num_hidden_layers"]),
        )


def family_from_configs(configs: dict) -> Family:
    """SD2 uses OpenCLIP (gelu activation) as text encoder, SD1 OpenAI CLIP (quick_gelu)."""
    if "family" in configs:
        return {"sd1": SD1, "sd2": SD2}[configs["family"]]
    return SD2 if configs["text_encoder"].get("hidden_act", "quick_gelu") == "gelu" else SD1


def resolve_layout(configs_or_family) -> LdmLayout:
    """Accept an `LdmLayout`, a `Family` or its name (bundled full-size configs), a configs dict or `SDComponents`."""
    if isinstance(configs_or_family, LdmLayout):
        return configs_or_family
    if isinstance(configs_or_family, str):
        configs_or_family = {"sd1": SD1, "sd2": SD2}[configs_or_family]
    if isinstance(configs_or_family, Family):
        from .checkpoint import bundled_configs

        return LdmLayout.from_configs(bundled_configs(configs_or_family), configs_or_family)
    if isinstance(configs_or_family, dict):
        return LdmLayout.from_configs(configs_or_family)
    comps = configs_or_family  # SDComponents
    configs = {"unet": dict(comps.unet.config), "vae": dict(comps.vae.config),
               "text_encoder": comps.text_encoder.config.to_dict()}
    return LdmLayout.from_configs(configs, comps.family)


# ----------------------------------------------------------------------------------------------------------- U-Net
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise KeyError(head)
    return f"{table[head]}.{tail}"


# U-Net layers outside the blocks: diffusers prefix -> LDM prefix
UNET_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def unet_ldm_name(name: str, layout: LdmLayout) -> str:
    """`down_blocks.0.attentions.0.proj_in.weight` -> `input_blocks.1.1.proj_in.weight` (no prefixes)."""
    n = layout.layers_per_block
    for src, dst in UNET_FIXED.items():
        if name.startswith(src):
            return dst + name[len(src):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * (n + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else \
            f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * (n + 1) + j
        return f"output_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else \
            f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        i = int(m[1])
        return f"output_blocks.{i * (n + 1) + n}.{2 if layout.up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------------------- VAE
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": ("norm", False), "to_q": ("q", True), "to_k": ("k", True), "to_v": ("v", True),
             "to_out.0": ("proj_out", True)}


def vae_ldm_name(name: str, layout: LdmLayout) -> tuple[str, bool]:
    """`decoder.up_blocks.0.resnets.1.conv1.weight` -> (`decoder.up.3.block.1.conv1.weight`, conv1x1=False)."""
    if name.startswith(("quant_conv.", "post_quant_conv.")) or re.match(r"(en|de)coder\.conv_(in|out)\.", name):
        return name, False
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
        return f"{m[1]}.norm_out.{m[2]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    # the decoder's up blocks are numbered from the lowest resolution in diffusers, from the highest in LDM
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{layout.vae_blocks - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        return f"decoder.up.{layout.vae_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET)}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
        if m[2] in _VAE_ATTN:
            ldm, conv = _VAE_ATTN[m[2]]
            return f"{m[1]}.mid.attn_1.{ldm}.{m[3]}", conv and m[3] == "weight"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------- text encoder
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def te_ldm_key(name: str, layout: LdmLayout) -> LdmKey:
    """`text_model.encoder.layers.0.self_attn.q_proj.weight` -> the LDM key (+ rows for SD2's stacked q/k/v)."""
    if not name.startswith("text_model."):
        name = "text_model." + name
    if layout.te_layout == "clip":
        return LdmKey(CLIP_PREFIX + name)
    rest = name[len("text_model."):]
    if rest in _OPENCLIP_TOP:
        return LdmKey(OPENCLIP_PREFIX + _OPENCLIP_TOP[rest])
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m:
        block = f"{OPENCLIP_PREFIX}transformer.resblocks.{m[1]}."
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", m[2])
        if qkv:
            d = layout.te_hidden_size
            part = "qkv".index(qkv[1])
            return LdmKey(f"{block}attn.in_proj_{m[3]}", rows=slice(part * d, (part + 1) * d))
        if m[2] in _OPENCLIP_LAYER:
            return LdmKey(f"{block}{_OPENCLIP_LAYER[m[2]]}.{m[3]}")
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------------ public API
def ldm_key_for(param_name: str, configs_or_family) -> LdmKey:
    """Map a diffusers parameter name with its component prefix to its single-file (LDM) checkpoint key.

    `param_name`: e.g. `unet.down_blocks.0.attentions.0.proj_in.weight`,
    `vae.decoder.mid_block.attentions.0.to_q.weight` or
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight` (the `text_model.` level may be omitted).
    `configs_or_family`: the architecture — a `Family` / "sd1" / "sd2" (full-size SD1.5 / SD2.1 configs bundled
    with lorakit), a dict of diffusers configs, `SDComponents`, or an `LdmLayout`.

    Shapes are identical on both sides except in two places, so a merge can add a delta in place:
    - SD2 text encoder q/k/v: the returned `rows` slice selects the parameter inside the stacked `in_proj_*`.
    - VAE mid-block attention q/k/v/proj_out weights are 1x1 convolutions `[C, C, 1, 1]` in LDM but Linear `[C, C]`
      in diffusers (`conv1x1=True`).
    U-Net `proj_in`/`proj_out` are 1x1 convs (4-D) on both sides in SD1 and Linear (2-D) on both sides in SD2
    (`use_linear_projection`), so they need no reshape; a LoRA delta for an SD1 proj_in must be made 4-D.
    Raises `KeyError` for a name that has no counterpart in the LDM layout.
    """
    layout = resolve_layout(configs_or_family)
    component, _, name = param_name.partition(".")
    try:
        if component == "unet":
            return LdmKey(UNET_PREFIX + unet_ldm_name(name, layout))
        if component == "vae":
            key, conv = vae_ldm_name(name, layout)
            return LdmKey(VAE_PREFIX + key, conv1x1=conv)
        if component == "text_encoder":
            return te_ldm_key(name, layout)
    except KeyError:
        pass
    raise KeyError(f"{param_name!r} has no key in the single-file (LDM) layout; expected a parameter name starting "
                   f"with one of {', '.join(c + '.' for c in COMPONENTS)} as in a diffusers model's state dict")


def ldm_extra_keys(layout: LdmLayout) -> list[str]:
    """Keys a standard single file has that no diffusers parameter maps to (written with conventional values).

    SD1: the CLIP `position_ids` buffer. SD2: the OpenCLIP tower's last block (SD2 conditions on the penultimate
    layer, so diffusers drops it), `text_projection` and `logit_scale`.
    """
    if layout.te_layout == "clip":
        return [CLIP_PREFIX + "text_model.embeddings.position_ids"]
    last = f"{OPENCLIP_PREFIX}transformer.resblocks.{layout.te_layers}."
    block = [last + s for s in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                                "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    return block + [OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale"]
