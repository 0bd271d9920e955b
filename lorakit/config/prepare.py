"""Options of the `prepare` job: check, repair, caption edits, DreamBooth layout, regularisation images.

`lorakit prepare <action> <input_dir> [--options]`. One config serves all actions; `required_for_action()` says
which options an action needs (checked when the job runs, so a form can start from the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .schema import JobConfig, check_extension, option

PREPARE_ACTIONS = ("check", "repair", "captions", "dreambooth", "reg")
POLICIES = ("keep", "drop", "move")

# action -> options it cannot run without (besides the ones every action has)
REQUIRED = {
    "check": ("input_dir",),
    "repair": ("input_dir", "output_dir"),
    "captions": ("input_dir",),
    "dreambooth": ("input_dir", "output_dir", "identifier", "class_name"),
    "reg": ("pretrained_model_name_or_path", "class_prompt", "output_dir"),
}
EXAMPLES = {"input_dir": "--input_dir my_photos", "output_dir": "--output_dir my_photos_clean",
            "identifier": "--identifier sks", "class_name": "--class_name dog",
            "pretrained_model_name_or_path":
                "--pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5",
            "class_prompt": "--class_prompt 'a photo of a dog'"}


@dataclass(repr=False)
class PrepareConfig(JobConfig):
    """Check, repair, caption, lay out and regularise a dataset (outputs always go to a new folder)."""

    job = "prepare"
    positional = ("action", "input_dir")

    # ---------- every action
    action: str = option("check", "What to do: check, repair, captions, dreambooth, reg.", group="basic",
                         choices=PREPARE_ACTIONS, basic=True)
    input_dir: str = option("", "The folder (or .zip) of images to work on; it is only ever read.", group="basic",
                            basic=True)
    output_dir: str | None = option(None, "Where repaired / laid-out / generated data goes (a new folder, never the "
                                          "input folder).", group="basic", basic=True)
    replace_output: bool = option(False, "Replace what an earlier prepare run wrote into output_dir (for re-runs, "
                                         "e.g. a notebook's Run-all). Only a folder lorakit's prepare wrote is "
                                         "emptied; any other non-empty folder is refused.", group="basic")
    resolution: int = option(512, "Target training resolution (for 'too small' and bucket checks).",
                             group="basic", min=8)
    caption_extension: str = option(".txt", "Extension of caption files next to the images.", group="basic")

    # ---------- check
    report_file: str | None = option(None, "Also save the check report as JSON here.", group="check")
    contact_sheet_file: str | None = option(None, "Also save a thumbnail contact sheet (PNG) with problems marked.",
                                            group="check")
    near_duplicate_distance: int = option(6, "Perceptual-hash bits (of 64) within which images are near-duplicates.",
                                          group="check", min=0, max=32)
    huge_side: int | None = option(None, "A long side above this is reported as huge. Unset: max(4 x resolution, "
                                         "2048).", group="check", min=8)
    tokenizer_model: str | None = option(None, "Count caption tokens with this model's CLIP tokenizer (a diffusers "
                                               "folder or repo id). Unset: estimated.", group="check")

    # ---------- repair
    background: str = option("white", "Colour that transparent pixels are composited on (name or #rrggbb).",
                             group="repair")
    keep_alpha: bool = option(False, "Keep images' transparency (RGBA PNGs) instead of compositing it on "
                                     "`background`: for training with `alpha_mask`, where it is the loss mask.",
                              group="repair")
    max_side: int | None = option(None, "Shrink images whose long side is larger than this (e.g. 2048).",
                                  group="repair", min=8)
    duplicates: str = option("drop", "Exact duplicates: keep, drop, or move to <output_dir>_set_aside/.",
                             group="repair", choices=POLICIES)
    near_duplicates: str = option("keep", "Near-duplicates: keep, drop, or move to <output_dir>_set_aside/.",
                                  group="repair", choices=POLICIES)
    too_small: str = option("keep", "Too-small images: keep, drop, or move to <output_dir>_set_aside/.",
                            group="repair", choices=POLICIES)
    ascii_names: bool = option(False, "Rename files with non-ASCII names (accents dropped).", group="repair")
    default_caption: str | None = option(None, "Caption written for images with a missing or empty caption.",
                                         group="repair")

    # ---------- captions
    trigger: str | None = option(None, "Put this trigger word first in every caption (creates missing captions).",
                                 group="captions", basic=True)
    replace_tags: list[str] = option([], "Replace tags: `old=new` entries (`old=` removes).", group="captions")
    remove_tags: list[str] = option([], "Remove these tags.", group="captions")
    dedupe_tags: bool = option(False, "Keep each tag once per caption.", group="captions")
    auto_caption: bool = option(False, "Write captions for uncaptioned images with a captioning model (needs the "
                                       "Hub).", group="captions")
    caption_model: str = option("Salesforce/blip-image-captioning-base", "Captioning model for auto_caption.",
                                group="captions")
    overwrite_captions: bool = option(False, "auto_caption also replaces existing captions.", group="captions")
    in_place: bool = option(False, "Edit the caption files in input_dir itself instead of writing output_dir.",
                            group="captions")

    # ---------- dreambooth
    identifier: str | None = option(None, "Rare token that names your subject (e.g. sks).", group="dreambooth",
                                    basic=True)
    class_name: str | None = option(None, "The subject's class (e.g. dog, woman, style).", group="dreambooth",
                                    basic=True)
    repeats: int | None = option(None, "Repeats per epoch. Unset: suggested from target_steps.", group="dreambooth",
                                 min=1)
    target_steps: int = option(1600, "Training steps you plan (to suggest repeats).", group="dreambooth", min=1)
    epochs: int = option(10, "Epochs you plan (to suggest repeats).", group="dreambooth", min=1)
    train_batch_size: int = option(1, "Batch size you will train with (steps per epoch).", group="dreambooth", min=1)
    with_reg: bool = option(False, "You will train with regularisation images (doubles steps per epoch).",
                            group="dreambooth")

    # ---------- reg
    pretrained_model_name_or_path: str | None = option(None, "Base model for class images (folder, file or repo "
                                                             "id).", group="reg")
    class_prompt: str | None = option(None, "Prompt for class images, e.g. 'a photo of a dog'.", group="reg")
    num_images: int = option(200, "How many class images the folder should hold.", group="reg", min=0)
    negative_prompt: str | None = option(None, "Negative prompt for class images.", group="reg")
    num_inference_steps: int = option(30, "Sampling steps per class image.", group="reg", min=1)
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.", group="reg", min=0.0)
    generation_batch_size: int = option(4, "Class images generated per batch.", group="reg", min=1)
    seed: int = option(0, "Image i uses seed + i (so resumed runs give the same images).", group="reg")
    device: str | None = option(None, "cuda, mps or cpu. Unset: the best available.", group="reg")

    def check(self) -> None:
        check_extension("caption_extension", self.caption_extension)
        if self.output_dir and self.input_dir and self.action != "reg":
            out, src = Path(self.output_dir).resolve(), Path(self.input_dir).resolve()
            if out == src or src in out.parents or out in src.parents:
                raise ConfigError(f"`output_dir` ({self.output_dir}) must be a new folder outside `input_dir` "
                                  f"({self.input_dir}), and not holding it; lorakit never writes into your originals")

    def required_for_action(self) -> None:
        """Raise ConfigError naming the first option this action needs but did not get."""
        for name in REQUIRED[self.action]:
            if not getattr(self, name):
                raise ConfigError(f"`{name}` is required for `prepare {self.action}` (e.g. {EXAMPLES[name]})")
        if self.action == "captions":
            if not (self.trigger or self.replace_tags or self.remove_tags or self.dedupe_tags or self.auto_caption):
                raise ConfigError("`prepare captions` needs an edit: --trigger, --replace_tags, --remove_tags, "
                                  "--dedupe_tags or --auto_caption")
            if not self.output_dir and not self.in_place:
                raise ConfigError("`prepare captions` writes to a new folder: give --output_dir (or --in_place to "
                                  "edit the caption files in input_dir)")
