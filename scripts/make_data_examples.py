"""Rewrite the bundled `data_examples/` (DreamBooth + captions examples drawn from the toy world, TOMLs, prompts).

    python scripts/make_data_examples.py [--dest data_examples] [--seed 0]

The output is a pure function of the seed: running it on a clean checkout changes no file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lorakit.toy.examples import make_data_examples  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / "data_examples"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in make_data_examples(args.dest, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
