"""Tokenizers for single-file checkpoints, which carry none of their own.

A file lorakit writes for a non-standard vocabulary (tiny/toy models, added tokens) stores its tokenizer files as
JSON in the `lorakit.tokenizer` metadata. Every other SD1.x/SD2.x file uses CLIP's standard 49,408-token BPE
tokenizer, built offline from the merges shipped in `lorakit/configs/clip_tokenizer/` (MIT, see NOTICE there);
SD2 pads with `!` as OpenCLIP does, SD1 with `<|endoftext|>` (the bundled tokenizer configs say which).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import ModelLoadError
from .families import SD1, Family


def _bpe_path() -> Path:
    return SD1.config_dir.parent / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_files() -> dict[str, str]:
    """`vocab.json` / `merges.txt` of the standard 49,408-token CLIP tokenizer, built from the bundled BPE merges.

    Vocabulary order as in OpenAI CLIP: 256 byte symbols, the same with `</w>`, one token per merge, then
    `<|startoftext|>`, `<|endoftext|>`.
    """
    import gzip

    from .tiny import bytes_to_unicode

    lines = gzip.decompress(_bpe_path().read_bytes()).decode("utf-8").splitlines()
    merges = [m for m in lines[1:] if m]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}


def tokenizer_from_files(files: dict[str, str]):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="lorakit-tok-") as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def load_tokenizer_for(configs: dict, family: Family, metadata: dict[str, str] | None = None):
    """The tokenizer of a single file: the one stored in its metadata, else the standard CLIP tokenizer."""
    from .checkpoint import CLIP_VOCAB_SIZE, TOKENIZER_META_KEY

    raw = (metadata or {}).get(TOKENIZER_META_KEY)
    if raw:
        return tokenizer_from_files(json.loads(raw))
    vocab_size = configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE)
    if vocab_size != CLIP_VOCAB_SIZE:
        raise ModelLoadError(f"the checkpoint's text encoder has {vocab_size} tokens, not CLIP's {CLIP_VOCAB_SIZE}, "
                             "and the file carries no tokenizer; load it as a diffusers folder instead")
    tok_dir = family.config_dir / "tokenizer"
    files = {p.name: p.read_text() for p in tok_dir.glob("*.json")}
    return tokenizer_from_files({**files, **clip_vocab_files()})


def tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="lorakit-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.suffix in (".json", ".txt")}
