"""Captions written by a captioning model (BLIP, via transformers) — or by any `image -> str` function you pass.

The model comes from the Hugging Face Hub, so this needs a connection the first time (Colab has one). Offline, and
with the model not already in the local cache, it stops with a message saying exactly that.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from PIL import Image, ImageOps

from ..errors import ModelLoadError
from .captions import CaptionEdit, map_captions, with_trigger

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def blip_captioner(model: str = DEFAULT_CAPTION_MODEL, *, device: str | None = None, max_new_tokens: int = 40,
                   prompt: str | None = None) -> Callable[[Image.Image], str]:
    """Load a BLIP captioning model (a Hub id or a local folder) and return `caption(image) -> str`."""
    local = os.path.isdir(model)
    offline = _offline()
    if offline and not local and not _cached(model):
        raise ModelLoadError(
            f"auto-captioning needs the captioning model `{model}` from the Hugging Face Hub, but this machine is "
            f"offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set) and the model is not in the local cache. "
            f"Run it online once (e.g. on Colab), point `caption_model` at a downloaded folder, or write captions "
            f"with `lorakit prepare captions --trigger ...`.")
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(model, local_files_only=offline or local)
        net = BlipForConditionalGeneration.from_pretrained(model, local_files_only=offline or local)
    except OSError as e:
        raise ModelLoadError(f"could not load the captioning model `{model}`: {str(e).splitlines()[0]}. Check the "
                             f"name and your connection.") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()

    @torch.no_grad()
    def caption(image: Image.Image) -> str:
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt").to(device)
        ids = net.generate(**inputs, max_new_tokens=max_new_tokens)
        return processor.decode(ids[0], skip_special_tokens=True).strip()

    return caption


def auto_caption(folder, *, output_dir=None, in_place: bool = False, model: str = DEFAULT_CAPTION_MODEL,
                 captioner: Callable[[Image.Image], str] | None = None, trigger: str | None = None,
                 overwrite: bool = False, caption_extension: str = ".txt", device: str | None = None,
                 progress: bool = True) -> CaptionEdit:
    """Write a caption for every image that has none (all images with `overwrite=True`).

    captioner: any `image -> caption` function; default: the BLIP model `model` from the Hub.
    trigger: put this word first in every written caption.
    """
    from ..data.images import to_rgb
    from .sources import DatasetSource

    caption_fn = captioner or blip_captioner(model, device=device)
    with DatasetSource(folder) as src:
        todo = None
        if progress:
            from tqdm.auto import tqdm

            todo = tqdm(desc="captioning", unit="img")

        def fn(old, rel):
            if old is not None and old.strip() and not overwrite:
                return None
            try:
                with Image.open(io.BytesIO(src.read(rel))) as im:
                    image = to_rgb(ImageOps.exif_transpose(im))
            except (OSError, SyntaxError, ValueError):
                return None  # unreadable: `prepare check` reports it, there is nothing to caption
            text = caption_fn(image)
            if todo is not None:
                todo.update(1)
            return with_trigger(text, trigger) if trigger else text

        try:
            return map_captions(folder, fn, output_dir=output_dir, in_place=in_place,
                                caption_extension=caption_extension)
        finally:
            if todo is not None:
                todo.close()
