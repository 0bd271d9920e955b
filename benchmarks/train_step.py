"""Cost of lorakit's training step against the bare frozen U-Net step, on full-size SD1.5 shapes (random weights).

    python benchmarks/train_step.py                    # CPU: batch 1, 512px, dim 16, cached latents, fp32
    python benchmarks/train_step.py --device cuda      # GPU: fp16, with and without gradient checkpointing

(a) bare: `unet(x_t, t, text).sample`, MSE, backward — frozen weights, gradients for the activations only (the least
    any LoRA step must do). On CPU one bare step runs between every two lorakit steps, so both see the same machine
    load (the development machines are shared and noisy) and the same malloc settings, on the same U-Net with its
    LoRA layers switched off (peft's `disable_adapters`: each layer calls its base layer only), so both read the same
    weights in the same memory (a second copy of the U-Net measured up to 5% apart from the first in one process).
(b) lorakit: `lorakit.train(...)` on a one-image dataset with the same components; the step time is the interval
    between consecutive `on_step` callbacks (everything the loop does: text encoder, noise, loss, optimizer), after
    warm-up steps. Two configurations: LoRA on text encoder + U-Net (sd-scripts' default, the one in
    docs/PERFORMANCE.md) and U-Net only (the frozen text encoder's output is then cached per caption).
(c) with `--default-malloc`: the same, with glibc's default malloc behaviour instead of the CPU loop's
    `keep_freed_memory` (which makes malloc reuse freed memory instead of unmapping it) — what that setting saves.
(d) with `--peft-layers`: the same lorakit step with peft's stock LoRA layers (`result + B(A(x)) * scale`) swapped
    in for lorakit's fused ones after the warm-up step — what the fused training step saves, measured side by side.
(e) with `--split` (CPU): where each step's time goes — the text encoder's forward, the U-Net's forward, the backward
    pass until the text encoder's output has its gradient (the U-Net's backward and the loss), the rest of the
    backward (the text encoder's), the optimizer step — beside the bare step's forward and backward.
Ratios are measured side by side in one process. Each lorakit step is paired with the mean of the two bare steps
timed just before and just after it. Printed: the ratio of the mean times with its 95% bootstrap interval (the pairs
resampled together), the ratio of the fastest times, and the median of the pairs' ratios (the steadiest on a shared
machine). Peak RSS is the process's high-water mark (ru_maxrss).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def full_size_sd15():
    """SD1.5-shaped components with random weights, built from lorakit's bundled configs (no download)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from lorakit.checkpoint import bundled_configs, modules_from_configs
    from lorakit.families import SD1
    from lorakit.models import SDComponents
    from lorakit.tiny import write_clip_tokenizer

    cfg = bundled_configs(SD1)
    torch.manual_seed(0)
    unet, vae, text_encoder = modules_from_configs(cfg)
    tok_dir = write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok", ["photo", "sks", "toy"])
    return SDComponents(tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
                        text_encoder=text_encoder, vae=vae, unet=unet,
                        noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]), family=SD1, source="random")


def ratio_interval(times: list[float], bare: list[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(times) / mean(bare), resampling the (lorakit, bare) pairs together."""
    rng, pairs = random.Random(seed), list(zip(times, bare))
    ratios = sorted(statistics.mean(a for a, _ in sample) / statistics.mean(b for _, b in sample)
                    for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(resamples)))
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def bracketing(bare: list[float]) -> list[float]:
    """Each lorakit step's reference: the mean of the bare steps timed just before and just after it, so that a
    machine getting steadily faster or slower during the run moves both sides of each pair alike."""
    return [(before + after) / 2 for before, after in zip(bare, bare[1:])]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bare_step_times(unet, steps: int, device, dtype, warmup: int = 1, parts: list | None = None) -> list[float]:
    """Frozen U-Net forward + backward (activation gradients only; the U-Net's weights must be frozen). `parts`:
    gets (forward s, backward s) of each timed step."""
    x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype, requires_grad=True)
    noise = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    text = torch.randn(1, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.mse_loss(unet(x, t, text).sample.float(), noise.float())
        forward = time.perf_counter() - start
        loss.backward()
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if parts is not None:
                parts.append((forward, times[-1] - forward))
    return times


class StepSplit:
    """Marks the parts of each lorakit step (CPU; see (e) above) by wrapping the loop's `encode_text` and
    `optimizer_step` and hooking the U-Net's forward; bare steps timed meanwhile (`paused`) are not marked."""

    PARTS = ("text encoder forward", "U-Net forward", "backward until the text states' gradient",
             "rest of the backward", "optimizer step")

    def __init__(self, unet):
        import lorakit.training as loop

        self.loop, self.paused, self.marks, self.bare = loop, False, [], []
        self._originals = loop.encode_text, loop.optimizer_step
        encode, step = self._originals

        def encode_text(captions, run):
            self._mark("te0")
            hidden = encode(captions, run)
            self._mark("te1")
            if hidden.requires_grad:  # the text encoder trains: its backward starts when this gradient is complete
                hidden.register_hook(lambda grad: self._mark("text_grad"))
            return hidden

        def optimizer_step(*args, **kwargs):
            self._mark("opt0")
            stepped = step(*args, **kwargs)
            self._mark("opt1")
            return stepped

        loop.encode_text, loop.optimizer_step = encode_text, optimizer_step
        self._hooks = [unet.register_forward_pre_hook(lambda module, args: self._mark("unet0")),
                       unet.register_forward_hook(lambda module, args, out: self._mark("unet1"))]

    def _mark(self, name: str) -> None:
        if not self.paused:
            if name == "te0" or not self.marks:
                self.marks.append({})
            self.marks[-1][name] = time.perf_counter()

    def close(self) -> None:
        self.loop.encode_text, self.loop.optimizer_step = self._originals
        for hook in self._hooks:
            hook.remove()

    def rows(self, warmup: int) -> list[tuple[str, float, float | None]]:
        """(part, mean lorakit s, mean bare s or None) over the timed steps: after the untimed first step and the
        `warmup` steps (and the bare steps timed during the warm-up)."""
        steps, bare_parts = [m for m in self.marks if "opt1" in m][1 + warmup:], self.bare[warmup:]
        text_grad = [m.get("text_grad", m["opt0"]) for m in steps]
        spans = ([m["te1"] - m["te0"] for m in steps], [m["unet1"] - m["unet0"] for m in steps],
                 [g - m["unet1"] for g, m in zip(text_grad, steps)], [m["opt0"] - g for g, m in zip(text_grad, steps)],
                 [m["opt1"] - m["opt0"] for m in steps])
        bare = [statistics.mean(f for f, _ in bare_parts), statistics.mean(b for _, b in bare_parts)] if bare_parts \
            else [None, None]
        return [(part, statistics.mean(span), ref) for part, span, ref in
                zip(self.PARTS, spans, [None, bare[0], bare[1], None, None])]


class StepTimer:
    """Times lorakit's steps from `on_step` to `on_step`, excluding what runs inside the callback — there, with
    `between`, one bare step is timed, so bare and lorakit steps alternate under the same machine load."""

    def __init__(self, between=None):
        self.between = between
        self.first = None  # run once, after the first step (outside the timed intervals)
        self.steps, self.bare = [], []
        self.kernel = []  # (system CPU s, minor page faults) of each lorakit step
        self._resume = self._usage = None

    def on_step(self, info):
        now, usage = self._sync_time(), resource.getrusage(resource.RUSAGE_SELF)
        if self.first is not None:
            self.first, first = None, self.first
            first()
        if self._resume is not None:
            self.steps.append(now - self._resume)
            self.kernel.append((usage.ru_stime - self._usage.ru_stime, usage.ru_minflt - self._usage.ru_minflt))
        if self.between is not None:
            self.bare.append(self.between())
        self._usage, self._resume = resource.getrusage(resource.RUSAGE_SELF), self._sync_time()

    @staticmethod
    def _sync_time() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()


@contextlib.contextmanager
def adapters_off(unet):
    """Every LoRA layer of `unet` runs its base layer only, until the block ends (parameters untouched)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def use_peft_layers(comps) -> None:
    """Swap lorakit's fused LoRA layers for peft's stock classes (same parameters and state; peft's forward)."""
    from peft.tuners.lora import layer as peft_lora

    from lorakit.lora_layers import LoraConv2d, LoraLinear

    stock = {LoraLinear: peft_lora.Linear, LoraConv2d: peft_lora.Conv2d}
    for model in (comps.unet, comps.text_encoder):
        for module in model.modules():
            if type(module) in stock:
                module.__class__ = stock[type(module)]


def lorakit_step_times(comps, data: Path, out: Path, steps: int, warmup: int, between=None, peft_layers=False,
                       **options):
    """(lorakit step times, bare step times measured in between, (system s, page faults) of the lorakit steps)
    after `warmup` steps. With `between`, lorakit step i runs between bare steps i and i + 1 (one more bare time than
    lorakit times)."""
    import lorakit

    timer = StepTimer(between)
    if peft_layers:
        timer.first = lambda: use_peft_layers(comps)
    lorakit.train(components=comps, callbacks=timer, train_data_dir=str(data), output_dir=str(out),
                  max_train_steps=warmup + steps + 1, resolution="512", network_dim=16, train_batch_size=1,
                  cache_latents=True, sample_at_end=False, **options)
    return timer.steps[warmup:], timer.bare[warmup:], timer.kernel[warmup:]


def make_dataset(root: Path) -> Path:
    from PIL import Image

    folder = root / "data" / "1_sks toy"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(512, 512, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / "0.png")
    return root / "data"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (cpu 3, cuda 20)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared "
                        "machine, where every op's thread barrier waits for a busy core)")
    parser.add_argument("--peft-layers", action="store_true", help="also time each step with peft's stock LoRA layers")
    parser.add_argument("--default-malloc", action="store_true", help="also time each step with glibc's default "
                        "malloc behaviour (freed memory unmapped, as without lorakit's keep_freed_memory)")
    parser.add_argument("--split", action="store_true", help="CPU: also print where each step's time goes (text "
                        "encoder, U-Net forward, backward, optimizer) beside the bare step's forward and backward")
    parser.add_argument("--only", choices=["te_unet", "unet"], help="time one configuration only: LoRA on text "
                        "encoder + U-Net, or on the U-Net alone")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (3 if device.type == "cpu" else 20)
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    data = make_dataset(root)
    t0 = time.perf_counter()
    comps = full_size_sd15()
    print(f"built SD1.5-shaped components in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)

    if device.type == "cpu":
        comps.to(device=device, dtype=torch.float32)
        split = None

        def bare_step() -> float:  # lorakit's U-Net (base frozen) with its LoRA layers switched off
            if split is not None:
                split.paused = True
            try:
                with adapters_off(comps.unet):
                    return bare_step_times(comps.unet, 1, device, torch.float32, warmup=0,
                                           parts=None if split is None else split.bare)[0]
            finally:
                if split is not None:
                    split.paused = False

        import lorakit.training

        variants = [("", False, False)] + ([(", peft layers", True, False)] if args.peft_layers else []) + (
            [(", default malloc", False, True)] if args.default_malloc else [])
        rows = []
        configs = {"te_unet": ("TE + U-Net LoRA", {}), "unet": ("U-Net-only LoRA", {"network_train_unet_only": True})}
        for key, (label, opts) in configs.items():
            if args.only not in (None, key):
                continue
            for suffix, peft_layers, default_malloc in variants:
                name = label + suffix
                keep = lorakit.training.keep_freed_memory
                if default_malloc:
                    lorakit.training.keep_freed_memory = lambda enabled: contextlib.nullcontext(False)
                split = StepSplit(comps.unet) if args.split else None
                try:
                    out = root / name.replace(" ", "_").replace(",", "")
                    times, bare, kernel = lorakit_step_times(comps, data, out, steps, args.warmup, between=bare_step,
                                                             device="cpu", peft_layers=peft_layers, **opts)
                finally:
                    lorakit.training.keep_freed_memory = keep
                    if split is not None:
                        split.close()
                parts = split.rows(args.warmup) if split is not None else None
                split = None
                rows.append((name, times, bare, kernel, peak_rss_gb(), parts))
        print(f"\nSD1.5 shapes, CPU fp32, batch 1, 512px, dim 16, cached latents, SDPA; {steps} timed steps each, "
              f"alternating with a bare step")
        print(f"{'lorakit step':34s} {'lorakit s/step':>15s} {'bare s/step':>12s} {'ratio':>7s} {'95% interval':>13s} "
              f"{'min ratio':>10s} {'median pair':>12s} {'peak RSS':>9s}")
        for label, times, bare, kernel, rss, parts in rows:
            around = bracketing(bare)  # the mean of the bare steps just before and just after each lorakit step
            ratio = statistics.mean(times) / statistics.mean(around)
            low, high = ratio_interval(times, around)
            pairs = statistics.median(a / b for a, b in zip(times, around))
            print(f"{label:34s} {statistics.mean(times):15.2f} {statistics.mean(bare):12.2f} {ratio:7.3f} "
                  f"{low:6.3f}-{high:.3f} {min(times) / min(bare):10.3f} {pairs:12.3f} {rss:7.1f} GB")
            print(f"  samples: lorakit {', '.join(f'{x:.2f}' for x in times)}; "
                  f"bare {', '.join(f'{x:.2f}' for x in bare)}")
            print(f"  lorakit step in the kernel: {statistics.mean(s for s, _ in kernel):.2f} s system time, "
                  f"{statistics.mean(f for _, f in kernel):,.0f} minor page faults per step")
            for part, spent, reference in parts or ():
                print(f"  {part:42s} {spent:7.3f} s" + ("" if reference is None else
                                                        f"   bare {reference:7.3f} s   {spent - reference:+.3f} s"))
        return

    comps.to(device=device, dtype=torch.float16)
    comps.unet.requires_grad_(False)
    bare = bare_step_times(comps.unet, steps, device, torch.float16, args.warmup)
    print(f"\nSD1.5 shapes, {torch.cuda.get_device_name(device)}, fp16, batch 1, 512px, dim 16, cached latents")
    print(f"{'run':46s} {'it/s':>7s} {'ratio':>7s} {'max_memory_allocated':>21s}")
    print(f"{'(a) bare frozen U-Net fwd+bwd (fp16 weights)':46s} {1 / statistics.mean(bare):7.2f} {1.0:7.3f}")
    runs = [(ckpt, peft) for ckpt in (False, True) for peft in ((False, True) if args.peft_layers else (False,))]
    for ckpt, peft_layers in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        times, _, _ = lorakit_step_times(comps, data, root / f"gpu_{ckpt}_{peft_layers}", steps, args.warmup,
                                      device=str(device), mixed_precision="fp16", gradient_checkpointing=ckpt,
                                      peft_layers=peft_layers)
        mem = torch.cuda.max_memory_allocated(device) / 1024**3
        label = f"(b) lorakit TE+U-Net, checkpointing {'on' if ckpt else 'off'}" + (", peft" if peft_layers else "")
        print(f"{label:46s} {1 / statistics.mean(times):7.2f} {statistics.mean(times) / statistics.mean(bare):7.3f}"
              f" {mem:18.2f} GiB")
        if ckpt:
            comps.unet.disable_gradient_checkpointing()

if __name__ == "__main__":
    sys.exit(main())
