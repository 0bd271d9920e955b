"""Push a trained LoRA to the Hugging Face Hub: the LoRA file(s), sample images and a model card, in one commit.

`plan_upload(cfg)` works offline: it finds the files in the training output folder, reads the LoRA's metadata and
writes the model card (`README.md`, YAML metadata in the format the Hub's LoRA pages read: `base_model`, `tags`,
`instance_prompt`, `license`, a `widget` gallery of samples). `push_to_hub` then creates/updates the repo and uploads
the plan with one `create_commit`, so the repo never holds half an upload.

The token comes from `token=`, `HF_TOKEN` or `huggingface_hub.login()`; it is handed to `HfApi` and nowhere else —
never printed, never written into the card, the config or any file (`PushConfig.token` is a secret field).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import PushConfig
from .errors import ConfigError, HubError, LoraFormatError, LorakitError
from .fileio import write_text
from .lora_metadata import SESSION_TEXT

TAGS = ["lora", "text-to-image", "stable-diffusion", "lorakit"]
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
CARD_MARKER = ("<!-- model card written by lorakit push, rewritten on each push: "
               "delete this line to keep your edits -->")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_GALLERY = 8
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# settings shown in the card's table: (label, lorakit config key, sd-scripts metadata key)
SETTINGS = [
    ("base model", "pretrained_model_name_or_path", "ss_sd_model_name"),
    ("rank (network_dim)", "network_dim", "ss_network_dim"),
    ("alpha (network_alpha)", "network_alpha", "ss_network_alpha"),
    ("learning rate", "learning_rate", "ss_learning_rate"),
    ("U-Net learning rate", "unet_lr", "ss_unet_lr"),
    ("text encoder learning rate", "text_encoder_lr", "ss_text_encoder_lr"),
    ("steps", "max_train_steps", "ss_steps"),
    ("resolution", "resolution", "ss_resolution"),
    ("batch size", "train_batch_size", "ss_batch_size_per_device"),
    ("optimizer", "optimizer_type", "ss_optimizer"),
    ("LR scheduler", "lr_scheduler", "ss_lr_scheduler"),
    ("mixed precision", "mixed_precision", "ss_mixed_precision"),
    ("clip skip", "clip_skip", "ss_clip_skip"),
    ("noise offset", "noise_offset", "ss_noise_offset"),
    ("min-SNR gamma", "min_snr_gamma", "ss_min_snr_gamma"),
    ("seed", "seed", "ss_seed"),
]


@dataclass
class UploadPlan:
    """What `push_to_hub` will upload: (local file, path in the repo) pairs plus the card text."""

    repo_id: str
    files: list[tuple[Path, str]]
    card: str
    private: bool
    commit_message: str
    metadata: dict = field(default_factory=dict)
    withheld: list[tuple[str, str]] = field(default_factory=list)  # (file, why it is not uploaded)

    @property
    def paths_in_repo(self) -> list[str]:
        return [p for _, p in self.files]


# ------------------------------------------------------------------------------------------------ reading outputs
def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` header (empty for other formats)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise LoraFormatError(f"{path.name}: not a readable .safetensors file ({e})") from None


def training_config(meta: dict[str, str]) -> dict:
    """lorakit's resolved training config stored in the LoRA header, or {} (files from other tools)."""
    from .lora_metadata import training_config_of

    return training_config_of(meta) or {}


def _main_lora(files: list[Path], meta_name: str | None) -> Path:
    """The final LoRA: the one named like the run, else one without a `-000400`-style step suffix, else newest."""
    by_stem = {p.stem: p for p in files}
    if meta_name and meta_name in by_stem:
        return by_stem[meta_name]
    finals = [p for p in files if not re.search(r"[-_](step|e|epoch)?\d{3,}$", p.stem)]
    return max(finals or files, key=lambda p: p.stat().st_mtime)


def _run_image(image: Path, out: Path) -> bool:
    """Whether `image` is one a training run writes in `out`: a sample (in `samples/`, or tagged with its run's
    session), `samples_grid.png`, or a notebook's `<name>_loss.png` / `<name>_samples.png`."""
    rel = image.relative_to(out)
    if len(rel.parts) == 1 and (image.name == "samples_grid.png" or image.stem.endswith(("_loss", "_samples"))):
        return True
    return rel.parts[0] == "samples" or _png_text(image, SESSION_TEXT) is not None


def _png_text(image: Path, key: str) -> str | None:
    """A PNG's text chunk `key`, or None (no such chunk, or not a readable image)."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            value = im.info.get(key)
    except OSError:
        return None
    return str(value) if value is not None else None


def _prompt_of(image: Path) -> str:
    """A sample's prompt: the PNG `parameters`/`prompt` text chunk (A1111 convention), a sidecar .txt, or its name."""
    try:
        from PIL import Image

        with Image.open(image) as im:
            text = im.info.get("prompt") or im.info.get("parameters") or ""
        if text:
            return str(text).split("\n")[0].strip()
    except OSError:
        pass
    for side in (image.with_suffix(".txt"), image.with_suffix(".json")):
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace")
            if side.suffix == ".json":
                try:
                    text = json.loads(text).get("prompt", "")
                except (ValueError, AttributeError):
                    text = ""
            if text.strip():
                return text.strip().split("\n")[0]
    return image.stem.replace("_", " ")


def _trigger_words(meta: dict[str, str], train_cfg: dict) -> str | None:
    """`sks shape` from DreamBooth folder names like `20_sks shape` in the metadata's dataset dirs."""
    dirs = {}
    try:
        dirs = json.loads(meta.get("ss_dataset_dirs", "{}")) or {}
    except ValueError:
        pass
    names = [re.sub(r"^\d+_", "", Path(d).name) for d in dirs if re.match(r"^\d+_", Path(d).name)]
    if not names and train_cfg.get("train_data_dir"):
        folder = Path(train_cfg["train_data_dir"])
        if folder.is_dir():
            names = [re.sub(r"^\d+_", "", p.name) for p in sorted(folder.iterdir())
                     if p.is_dir() and re.match(r"^\d+_", p.name)]
    return ", ".join(dict.fromkeys(names)) or None


def _looks_like_repo_id(name: str | None) -> bool:
    """`owner/name` of a model the Hub has (the card's `base_model` must be one): not a local path or file, nor
    `lorakit-toy`, which only lorakit knows."""
    return bool(name) and not Path(name).suffix and not name.startswith((".", "/", "~")) and "\\" not in name \
        and name.count("/") == 1 and not Path(name).exists()


# --------------------------------------------------------------------------------------------------- model card
def model_card(*, title: str, lora_file: str, base_model: str | None, instance_prompt: str | None, license: str,
               gallery: list[tuple[str, str]], settings: list[tuple[str, str]], repo_id: str | None = None) -> str:
    """The README.md text: YAML metadata the Hub reads, then a human description, usage and the settings table."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=license, tags=list(TAGS), library_name="diffusers",
        base_model=base_model if _looks_like_repo_id(base_model) else None,
        instance_prompt=instance_prompt,
        widget=[{"text": prompt, "output": {"url": url}} for url, prompt in gallery] or None,
    )
    trigger = (f"Use the trigger words **`{instance_prompt}`** in your prompt.\n\n" if instance_prompt else "")
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in settings) or "| (no training metadata found) | |"
    body = (
        f"# {title}\n\n"
        f"A LoRA for Stable Diffusion{f' (`{base_model}`)' if base_model else ''}, trained with "
        f"lorakit — a kohya-format `.safetensors` file that A1111, ComfyUI, diffusers and "
        f"sd-scripts read.\n\n{trigger}"
        "## Use it with diffusers\n\n```python\nimport torch\nfrom diffusers import StableDiffusionPipeline\n\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({base_model or '<base model>'!r}, "
        f"torch_dtype=torch.float16).to('cuda')\n"
        f"pipe.load_lora_weights({repo_id or '<this repo>'!r}, weight_name={lora_file!r})\n"
        f"image = pipe({(instance_prompt or 'your prompt')!r}).images[0]\n```\n\n"
        "## Training settings\n\n| setting | value |\n|---|---|\n" + rows + "\n"
    )
    text = f"---\n{data.to_yaml()}\n---\n\n{CARD_MARKER}\n{body}"
    ModelCard(text, ignore_metadata_errors=False)  # the Hub's own parser must accept it
    return text


# ------------------------------------------------------------------------------------------------------ the plan
def _config(cfg: PushConfig | None, kwargs: dict) -> PushConfig:
    if cfg is None:
        return PushConfig.from_dict(kwargs)
    return cfg.replace(**kwargs) if kwargs else cfg


def plan_upload(cfg: PushConfig | None = None, /, **kwargs) -> UploadPlan:
    """Find what to upload and write the model card to `<output_dir>/README.md` (offline, no token needed)."""
    cfg = _config(cfg, kwargs)
    if not cfg.repo_id or not _REPO_ID.match(cfg.repo_id):
        raise ConfigError(f"`repo_id` must be a Hub repo name like `your-name/my-lora`, got {cfg.repo_id!r}")
    out = Path(cfg.output_dir)
    if not out.is_dir():
        raise ConfigError(f"`output_dir` {str(out)!r} does not exist: train first, or point it at the folder "
                          f"that holds your LoRA")
    loras = sorted(p for p in out.iterdir() if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    if not loras:
        raise ConfigError(f"no LoRA file (.safetensors/.ckpt/.pt) in `output_dir` {str(out)!r}: train first")
    first_meta = read_lora_metadata(loras[0])
    main = _main_lora(loras, first_meta.get("ss_output_name"))
    meta = read_lora_metadata(main)
    train_cfg = training_config(meta)

    images = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(out).parts))
    # only the images a training run writes: a dataset kept inside output_dir is never published
    private = [p for p in images if not _run_image(p, out)]
    images = [p for p in images if p not in private]
    # an earlier run's saves and samples left in the folder (`overwrite`) are not this LoRA's: left out
    session = meta.get("ss_session_id")
    earlier = [p for p in loras if p != main and session and read_lora_metadata(p).get("ss_session_id")
               not in (None, session)]
    earlier += [p for p in images if session and _png_text(p, SESSION_TEXT) not in (None, session)]
    loras, images = [p for p in loras if p not in earlier], [p for p in images if p not in earlier]
    files = [(p, p.name) for p in loras]
    files += [(p, "images/" + p.relative_to(out).as_posix()) for p in images]
    configs, withheld = _shareable_configs(out)
    withheld += [(p.relative_to(out).as_posix(), "from an earlier training run in this folder") for p in earlier]
    if private:
        withheld.append((f"{len(private)} other image(s), e.g. {private[0].relative_to(out).as_posix()}",
                         "not written by training (such as a dataset kept in this folder): only the samples, "
                         "the sample grid and the loss plot are uploaded"))
    files += [(p, p.name) for p in configs]
    samples = [p for p in images if "loss" not in p.stem.lower()]
    last = sorted(samples, key=lambda p: (p.stat().st_mtime, p.name))[-MAX_GALLERY:]
    gallery = [("images/" + p.relative_to(out).as_posix(), _prompt_of(p)) for p in last]

    base_model = cfg.base_model or train_cfg.get("pretrained_model_name_or_path") or meta.get("ss_sd_model_name")
    instance_prompt = cfg.instance_prompt or _trigger_words(meta, train_cfg)
    settings = []
    for label, key, ss_key in SETTINGS:
        value = train_cfg.get(key, meta.get(ss_key))
        if value not in (None, "", "None"):
            settings.append((label, str(value)))
    card = model_card(title=cfg.repo_id.split("/")[-1], lora_file=main.name, base_model=base_model,
                      instance_prompt=instance_prompt, license=cfg.license, gallery=gallery, settings=settings,
                      repo_id=cfg.repo_id)
    readme = out / "README.md"
    if readme.is_file() and CARD_MARKER not in readme.read_text(encoding="utf-8", errors="replace"):
        print("note: README.md is yours (it has no lorakit marker): uploaded as it is, lorakit's card not written")
    else:
        write_text(readme, card)
    files.append((readme, "README.md"))
    return UploadPlan(cfg.repo_id, files, card, cfg.private, cfg.commit_message,
                      dict(base_model=base_model, instance_prompt=instance_prompt, lora=main.name), withheld)


_SECRET_KEYS = {"token", "hf_token", "hub_token", "api_key", "password"}
_TOKEN_TEXT = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


def _secret_key(table: dict) -> str | None:
    for key, value in table.items():
        if key.lower() in _SECRET_KEYS:
            return key
        found = _secret_key(value) if isinstance(value, dict) else None
        if found:
            return found
    return None


def _shareable_configs(out: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The TOML files of `output_dir` that may be uploaded, and those withheld with the reason: a TOML that sets a
    token (a push config kept beside the LoRA) or holds text like a Hub token is never uploaded. lorakit's own
    training config never contains the token (secret options are not saved)."""
    from .config.schema import tomllib

    keep, withheld = [], []
    for path in sorted(out.glob("*.toml")):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            key = _secret_key(tomllib.loads(text))
        except tomllib.TOMLDecodeError:
            withheld.append((path.name, "not valid TOML"))
            continue
        if key or _TOKEN_TEXT.search(text):
            withheld.append((path.name, f"it sets `{key}`" if key else "it holds text like a Hub token"))
        else:
            keep.append(path)
    return keep, withheld


# ---------------------------------------------------------------------------------------------------------- push
def resolve_token(explicit: str | None = None) -> str | None:
    """`explicit`, else HF_TOKEN, else the token saved by `huggingface_hub.login()`; None when there is none.
    Spaces and a newline around it (a pasted token, a secrets file) are dropped: sent with them, the token would
    be an invalid HTTP header, whose error message quotes it."""
    if explicit and explicit.strip():
        return explicit.strip()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file simply means "no token"
        return None


def _card_edited_on_the_hub(api, repo_id: str) -> bool:
    """Whether the repo's README.md exists and lacks lorakit's marker: its owner rewrote the card on the Hub, as
    removing the marker from the local README keeps a card too."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename="README.md", repo_type="model")
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return False  # a new repo, or one without a card
    return CARD_MARKER not in Path(path).read_text(encoding="utf-8", errors="replace")


def push_to_hub(cfg: PushConfig | None = None, /, *, api=None, **kwargs) -> str:
    """Create/update `repo_id` and upload the LoRA, samples and card in one commit; returns the repo URL.

    `api` is an `huggingface_hub.HfApi` (made from the token and `endpoint` when not given).
    """
    cfg = _config(cfg, kwargs)
    plan = plan_upload(cfg)
    for name, why in plan.withheld:
        print(f"not uploading {name}: {why}")
    if api is None:
        from huggingface_hub import HfApi

        token = resolve_token(cfg.token)
        if not token:
            raise ConfigError("no Hugging Face token: set the HF_TOKEN environment variable, log in with "
                              "`huggingface_hub.login()` (on Colab: `notebook_login()`), or pass `token=`")
        api = HfApi(endpoint=cfg.endpoint, token=token)
    try:
        return _upload(api, plan)
    except LorakitError:
        raise
    except Exception as e:  # noqa: BLE001 - the Hub's and the network's errors, as one line without the token
        token = getattr(api, "token", None)
        raise HubError(f"push to {plan.repo_id} failed: {type(e).__name__}: {redact(str(e), token)}") from None


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token, and anything that looks like a Hub token, replaced by `hf_***`."""
    if isinstance(token, str) and token:
        text = text.replace(token, "hf_***")
    return _TOKEN_TEXT.sub("hf_***", text)


def _upload(api, plan: UploadPlan) -> str:
    from huggingface_hub import CommitOperationAdd

    url = api.create_repo(repo_id=plan.repo_id, repo_type="model", private=plan.private, exist_ok=True)
    files = plan.files
    if any(dest == "README.md" for _, dest in files) and _card_edited_on_the_hub(api, plan.repo_id):
        print("note: README.md on the Hub has no lorakit marker (edited there): kept, lorakit's card not uploaded")
        files = [(src, dest) for src, dest in files if dest != "README.md"]
    ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files]
    api.create_commit(repo_id=plan.repo_id, repo_type="model", operations=ops, commit_message=plan.commit_message)
    url = str(url) if url else f"https://huggingface.co/{plan.repo_id}"
    print(f"uploaded {len(ops)} files to {url}")
    return url
