"""Pretrain the toy model (`lorakit-toy`) and its concept classifier from scratch.

    python scripts/pretrain_toy.py --device cuda --out toy-run     # the shipped run (~8 min on one H100)
    python scripts/pretrain_toy.py --device cpu --out toy-run      # the same recipe on a CPU (many hours)
    python scripts/pretrain_toy.py --classifier --out toy-run      # only the classifier (~1 min GPU, ~10 min CPU)
    python scripts/pretrain_toy.py --start_from stage2.safetensors --no_classifier --out toy-run
                                                  # only stage 3 (unknown words) on a stage-2 model (~10 min CPU)

Writes `<out>/diffusers/` (fp16), `<out>/lorakit-toy.safetensors` + its sha256, `<out>/classifier.safetensors`
and `<out>/pretrain.log`. Copy the two .safetensors into lorakit/toy/weights/ to ship them (see the README there).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lorakit.toy.classifier import accuracy, save_classifier, train_classifier  # noqa: E402
from lorakit.toy.pretrain import PretrainSettings, pretrain, unknown_words_stage  # noqa: E402
from lorakit.toy.release import save_release  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PretrainSettings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classifier", action="store_true", help="train only the concept classifier")
    parser.add_argument("--no_classifier", action="store_true", help="train only the toy model")
    parser.add_argument("--start_from", help="a model after stage 2 (single file): run only stage 3 on it")
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    only_classifier, no_classifier = args.pop("classifier"), args.pop("no_classifier")
    start_from = args.pop("start_from")
    settings = PretrainSettings(**args)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "pretrain.log", "a", encoding="utf-8")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if not no_classifier:
        classifier = train_classifier(seed=settings.seed, device=settings.device, log=log)
        log(f"classifier accuracy on fresh scenes: {accuracy(classifier)}")
        log(f"wrote {save_classifier(classifier, out / 'classifier.safetensors')}")
    if not only_classifier:
        comps = pretrain(settings, log=log) if start_from is None else unknown_words_stage(start_from, settings, log)
        for path in save_release(comps, out):
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
