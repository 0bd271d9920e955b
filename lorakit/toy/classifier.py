"""A small concept classifier for the toy world, used only to MEASURE what a model draws.

It is trained on the world's own generator (`lorakit.toy.world`, every concept, held-out ones included) and never
on any model's output, so it is an independent judge: "does this sample show a crescent?" is answered by a network
that learned crescents from the drawing code. Augmentations (blur, noise, small colour shifts) make it robust to
the softness of generated images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import world

HEADS = {"shape": world.SHAPES, "colour": world.COLOUR_NAMES, "fill": world.FILLS,
         "background": world.BACKGROUND_NAMES}
DEFAULT_PATH = Path(__file__).parent / "weights" / "classifier.safetensors"


class ConceptClassifier(nn.Module):
    """A 4-stage CNN on 32×32 images in [0, 1], with one linear head per concept kind (see `HEADS`)."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                      block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2))
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 2, len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Concept names per image, e.g. {"shape": ["circle", ...], "colour": [...], ...}."""
        self.eval()
        logits = self(images.float())
        return {k: [HEADS[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images differ by: softness, noise, slight colour and brightness shifts."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    amount = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.6)
    x = x + amount * (blur - x)
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)) + 0.06 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def train_classifier(steps: int = 2000, batch: int = 128, lr: float = 2e-3, seed: int = 0, device: str = "cpu",
                     log: Callable[[str], None] = print) -> ConceptClassifier:
    """Train on freshly drawn scenes of the whole world (all shapes, fills, colours, backgrounds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ConceptClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    for step in range(steps):
        scenes = world.sample_scenes(batch, g, shapes=world.SHAPES, fills=world.FILLS)
        x = _augment(world.render(scenes), g).to(device)
        targets = {"shape": scenes.shape, "colour": scenes.colour, "fill": scenes.fill,
                   "background": scenes.background}
        targets = {k: v.to(device) for k, v in targets.items()}
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s")
    return model.cpu().eval()


@torch.no_grad()
def accuracy(model: ConceptClassifier, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Accuracy per head on fresh, un-augmented scenes of the whole world."""
    scenes = world.sample_scenes(n, seed, shapes=world.SHAPES, fills=world.FILLS)
    pred = model.predict(world.render(scenes))
    truth = [scenes.describe(i) for i in range(n)]
    return {k: sum(p == t[k] for p, t in zip(pred[k], truth)) / n for k in HEADS}


def save_classifier(model: ConceptClassifier, path: str | Path = DEFAULT_PATH) -> Path:
    from ..fileio import save_safetensors

    return save_safetensors({k: v.half() for k, v in model.state_dict().items()}, path,
                            metadata={"heads": ",".join(HEADS), "format": "lorakit-toy-classifier"})


def load_classifier(path: str | Path = DEFAULT_PATH) -> ConceptClassifier:
    """The shipped classifier (or one saved by `save_classifier`)."""
    from safetensors.torch import load_file

    from ..errors import ModelLoadError

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"toy classifier weights not found: {path} (run scripts/pretrain_toy.py "
                             "--classifier_only to make them)")
    model = ConceptClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()
