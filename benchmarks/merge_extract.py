"""Merge and extract on full-size SD1.5 shapes (random weights, CPU): time, peak memory and reconstruction error.

    python benchmarks/merge_extract.py [--workdir DIR] [--keep]

Builds, without any download: a full-size SD1.5 single file in fp32 (4.3 GB; keys and shapes from lorakit's
bundled configs, random values streamed to disk), a "tuned" copy whose 264 LoRA target layers (192 U-Net + 72 text
encoder) differ by a fine-tune-like delta (a decaying spectrum plus a little full-rank noise), and a dim-16 LoRA.
Each measurement then runs in its own Python process, so its peak resident memory (`os.wait4`'s rusage) is its
own, start-up and imports included — as in the sd-scripts figures of docs/PERFORMANCE.md:

- merge the dim-16 LoRA into the fp32 file (fp32 and fp16 output);
- extract at dim 16 with the exact SVD, lorakit's default randomized SVD, and the default with sd-scripts'
  0.99 clamping; the relative reconstruction errors of the U-Net and the text encoder are printed side by side.

Files are written and read back while still in the page cache (as in a typical run right after a download).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD_SCRIPTS = {  # docs/PERFORMANCE.md, measured on this machine kind
    "merge": (27.5, 12.9), "merge_fp16": (19.9, 8.8), "extract": (73.6, 10.8),
}
SD_SCRIPTS_EXTRACT_ERROR, BEST_ERROR_THEIRS = 0.209, 0.098


# ------------------------------------------------------------------------------------------------ the inputs
def _random(key: str, shape, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g) * scale


def _delta(key: str, shape) -> torch.Tensor:
    """A fine-tune-like change: rank-64 with singular values decaying as 1/k, plus 3% full-rank noise."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + 1)
    out, inp = shape[0], int(torch.Size(shape[1:]).numel())
    k = 64
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    d = (torch.randn(out, k, generator=g) * s) @ torch.randn(k, inp, generator=g)
    d += 0.03 * d.norm() / (out * inp) ** 0.5 * torch.randn(out, inp, generator=g)
    return (d * (1e-3 / d.abs().mean())).reshape(shape)


def build_inputs(workdir: Path) -> dict[str, Path]:
    from lorakit.checkpoint import bundled_configs, diffusers_to_ldm, empty_modules
    from lorakit.fileio import save_safetensors
    from lorakit.model_weights import open_weights
    from lorakit.tensorstream import write_safetensors

    configs = bundled_configs("sd1")
    unet, vae, te = empty_modules(configs)
    meta = diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(),
                             "text_encoder": te.state_dict()}, configs)
    layout = [(k, tuple(v.shape), v.dtype) for k, v in meta.items()]

    def base_tensor(key):
        shape = meta[key].shape
        if meta[key].dtype != torch.float32:
            return torch.arange(shape[-1], dtype=meta[key].dtype).reshape(shape)  # position_ids
        return _random(key, shape)

    paths = {"base": workdir / "sd15-base.safetensors", "tuned": workdir / "sd15-tuned.safetensors",
             "lora": workdir / "lora-dim16.safetensors"}
    t = time.perf_counter()
    write_safetensors(paths["base"], layout, base_tensor)
    with open_weights(paths["base"]) as base:
        targets = base.targets()
        changed = {base.where(tg.param).key: tg for tg in targets}
    assert len(targets) == 264, len(targets)
    write_safetensors(paths["tuned"], layout,
                      lambda k: base_tensor(k) + _delta(k, meta[k].shape) if k in changed else base_tensor(k))
    lora = {}
    g = torch.Generator().manual_seed(0)
    for tg in targets:
        rest = tg.shape[1:]
        lora[tg.kohya + ".lora_down.weight"] = torch.randn(16, *rest, generator=g) * 0.01
        lora[tg.kohya + ".lora_up.weight"] = torch.randn(tg.shape[0], 16, *([1, 1] if len(rest) == 3 else []),
                                                         generator=g) * 0.01
        lora[tg.kohya + ".alpha"] = torch.tensor(8.0)
    save_safetensors(lora, paths["lora"], {"ss_network_dim": "16", "ss_network_alpha": "8"})
    print(f"inputs written in {time.perf_counter() - t:.0f} s: base {paths['base'].stat().st_size / 1e9:.2f} GB, "
          f"{len(targets)} LoRA target layers")
    return paths


# -------------------------------------------------------------------------------------------- child processes
def child(task: str, workdir: Path) -> None:
    """One measurement; prints a JSON line with what it measured inside the process."""
    start = time.perf_counter()
    base, tuned, lora = (workdir / n for n in ("sd15-base.safetensors", "sd15-tuned.safetensors",
                                               "lora-dim16.safetensors"))
    if task.startswith("merge"):
        from lorakit.merging import merge

        merge(sd_model=str(base), models=[str(lora)], save_to=str(workdir / f"{task}.safetensors"), overwrite=True,
              save_precision="fp16" if task == "merge_fp16" else "float")
        out = {}
    else:
        from lorakit.extraction import extract

        svd, clamp = {"extract_exact": ("exact", 1.0), "extract_lowrank": ("lowrank", 1.0),
                      "extract_lowrank_clamp": ("lowrank", 0.99)}[task]
        result = extract(model_org=str(base), model_tuned=str(tuned), save_to=str(workdir / f"{task}.safetensors"),
                         dim=16, svd=svd, clamp_quantile=clamp, overwrite=True)
        out = {"errors": result.errors, "extract_seconds": result.seconds, "svd_seconds": result.svd_seconds}
    out["inner_seconds"] = time.perf_counter() - start
    print("RESULT " + json.dumps(out), flush=True)


def measure(task: str, workdir: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", task, "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{task} failed:\n{output}")
    line = next(x for x in output.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res.update(wall=wall, peak_gb=usage.ru_maxrss * 1024 / 1e9)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the 9 GB of inputs for another run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.workdir))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not (workdir / "lora-dim16.safetensors").is_file():
            build_inputs(workdir)
        rows = {task: measure(task, workdir) for task in ("merge", "merge_fp16", "extract_exact", "extract_lowrank",
                                                          "extract_lowrank_clamp")}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU threads\n")
    print("| job (full-size SD1.5 shapes, CPU) | lorakit wall s (in-process s) | peak RSS GB | sd-scripts s / GB "
          "| time ratio |")
    print("|---|---|---|---|---|")
    for task, label, ref in (("merge", "merge dim-16 LoRA, fp32 output", "merge"),
                             ("merge_fp16", "merge dim-16 LoRA, fp16 output", "merge_fp16"),
                             ("extract_exact", "extract dim 16, exact SVD", "extract"),
                             ("extract_lowrank", "extract dim 16, randomized SVD (default)", "extract"),
                             ("extract_lowrank_clamp", "extract dim 16, randomized SVD, clamp 0.99", "extract")):
        r = rows[task]
        secs, gb = SD_SCRIPTS[ref]
        print(f"| {label} | {r['wall']:.1f} ({r['inner_seconds']:.1f}) | {r['peak_gb']:.2f} | {secs} / {gb} "
              f"| {r['wall'] / secs:.2f}x |")
    print("\n| extraction at dim 16 | U-Net rel. error | text-encoder rel. error | extract s (of which SVD) "
          "| vs exact |")
    print("|---|---|---|---|---|")
    exact = rows["extract_exact"]
    for task in ("extract_exact", "extract_lowrank", "extract_lowrank_clamp"):
        r = rows[task]
        e = r["errors"]
        print(f"| {task.removeprefix('extract_')} | {e['unet']:.4f} | {e['text_encoder']:.4f} | "
              f"{r['extract_seconds']:.1f} ({r['svd_seconds']:.1f}) | "
              f"{exact['extract_seconds'] / r['extract_seconds']:.1f}x faster overall, SVD "
              f"{exact['svd_seconds'] / r['svd_seconds']:.1f}x; error {e['unet'] / exact['errors']['unet']:.4f}x |")
    print(f"\n(sd-scripts on its own inputs: error {SD_SCRIPTS_EXTRACT_ERROR} where the best rank-16 error was "
          f"{BEST_ERROR_THEIRS}; the exact-SVD row above is the best rank-16 error on these inputs.)")


if __name__ == "__main__":
    main()
