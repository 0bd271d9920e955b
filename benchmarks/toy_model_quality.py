"""Are the toy model's own samples recognisable? For held-in prompts ("a red circle on a white background"), sample
N seeds each and report how often the independent classifier agrees with the prompt's shape and colour.

    python benchmarks/toy_model_quality.py --seeds 10 [--device cuda]

Target (issue 6): agreement on shape and colour ≥ 80% of samples. The table is copied into the model card.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="lorakit-toy")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lorakit.models import load_models
    from lorakit.toy import world
    from lorakit.toy.classifier import load_classifier
    from lorakit.toy.lesson import prompt_agreement

    comps = load_models(args.model, dtype=torch.float32, device=args.device)
    classifier = load_classifier()
    scenes = [dict(shape=s, colour=c, background=b) for (s, c), b in zip(
        itertools.product(world.HELD_IN_SHAPES, world.COLOUR_NAMES), itertools.cycle(world.BACKGROUND_NAMES))]
    rows = prompt_agreement(comps, scenes, range(args.seeds), classifier)
    print(f"\nheld-in prompts, {args.seeds} seeds each, DDIM 20 steps, guidance 5")
    print("| prompt | shape agrees | colour agrees | both |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['shape']:.0%} | {r['colour']:.0%} | {r['both']:.0%} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("shape", "colour", "both")}
    print(f"| **all {len(rows) * args.seeds} samples** | **{mean['shape']:.0%}** | **{mean['colour']:.0%}** | "
          f"**{mean['both']:.0%}** |")


if __name__ == "__main__":
    main()
