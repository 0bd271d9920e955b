"""The workshop lesson, timed: train each data_examples/ LoRA on the toy model through `lorakit.train` on the CPU,
then measure how often the classifier sees the new concept without and with the LoRA.

    python benchmarks/toy_lesson.py                    # both lessons, 2 threads, 20 seeds
    python benchmarks/toy_lesson.py --lessons dreambooth --seeds 40

Target (issue 6): each lesson's training ≤ 120 s wall on 2 cores; concept rate ≥ 80% with the LoRA, ≤ 10% without.
Also printed: the concept rate on each lesson's control prompts (`Lesson.controls`: for DreamBooth the class prompt
"a shape" and known scenes, for captions the lesson's scenes without the word "striped"), where a LoRA that learned
only its concept leaves it low.
Run it on an otherwise idle machine: the wall time is the figure a workshop participant will see.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse_sets(items: list[str]) -> dict:
    """`key=value` pairs, values read as TOML (numbers, booleans, quoted strings) or else as plain strings."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lessons", nargs="+", default=["dreambooth", "captions"])
    parser.add_argument("--seeds", type=int, default=20, help="samples per rate (seeds 1000..)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the workshop laptop's cores)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override TOML settings, e.g. --set max_train_steps=500 learning_rate=2e-3")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from lorakit.toy.lesson import run_lesson

    os.chdir(ROOT)  # the TOMLs' paths are relative to the repository root
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-lesson-") as tmp:
        for name in args.lessons:
            overrides = dict(output_dir=str(Path(tmp) / name))  # samples as in the TOML: part of the lesson
            overrides.update(_parse_sets(args.set))
            start = time.perf_counter()
            result = run_lesson(name, ROOT / "data_examples" / f"{name}.toml",
                                seeds=range(1000, 1000 + args.seeds), **overrides)
            rows.append((name, result, time.perf_counter() - start))
    print(f"\ntoy lesson on {args.threads} CPU thread(s), torch {torch.__version__}, {args.seeds} seeds per rate"
          + (f", settings {' '.join(args.set)}" if args.set else ""))
    print("| lesson | train wall s (target ≤ 120) | lesson + measurement s | concept rate without LoRA (≤ 10%) | "
          "with LoRA (≥ 80%) | on control prompts, without / with LoRA |")
    print("|---|---|---|---|---|---|")
    for name, r, total in rows:
        print(f"| {name} | {r.train_seconds:.1f} | {total:.1f} | {r.rate_without:.0%} | {r.rate_with:.0%} | "
              f"{r.control_without:.0%} / {r.control_with:.0%} |")


if __name__ == "__main__":
    main()
