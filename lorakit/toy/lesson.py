"""The workshop lesson, measured: train a LoRA on the toy model and count how often it draws the new concept.

`concept_rate` samples the model for a list of prompts and seeds and asks the independent classifier
(`lorakit.toy.classifier`) what each image shows. A lesson is a prompt set plus the concept it should produce:
- DreamBooth: "a sks shape" should become a crescent (a shape the toy model never saw);
- captions: "a red striped circle on a white background" (and other known shapes/colours) should be striped.
`run_lesson` trains through `lorakit.train` and returns the rates without and with the LoRA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .examples import CLASS_PROMPT, DREAMBOOTH_PROMPT, STYLE_WORD
from .sampling import sample


@dataclass(frozen=True)
class Lesson:
    name: str
    prompts: tuple[str, ...]  # cycled over the seeds
    key: str  # classifier head: "shape" | "colour" | "fill" | "background"
    target: str  # the concept the LoRA should produce
    controls: tuple[str, ...] = ()  # prompts that should not show it (the class prompt, other scenes)


_CONTROL_SCENES = world.sample_scenes(12, 7, fills=("solid",))
DREAMBOOTH = Lesson("dreambooth", (DREAMBOOTH_PROMPT,), "shape", world.HELD_OUT_SHAPES[0],
                    controls=(CLASS_PROMPT,) + tuple(world.caption(_CONTROL_SCENES, i) for i in range(5)))
CAPTIONS = Lesson("captions", tuple(
    world.caption(world.sample_scenes(12, 7, fills=(STYLE_WORD,)), i) for i in range(12)), "fill", STYLE_WORD,
    controls=tuple(world.caption(_CONTROL_SCENES, i) for i in range(12)))
LESSONS = {lesson.name: lesson for lesson in (DREAMBOOTH, CAPTIONS)}


@dataclass
class LessonResult:
    lesson: str
    rate_without: float
    rate_with: float
    train_seconds: float
    lora_path: Path
    n_seeds: int
    control_without: float | None = None  # the same rate on the lesson's control prompts (should stay low)
    control_with: float | None = None

    def __str__(self) -> str:
        text = (f"{self.lesson}: rate without LoRA {self.rate_without:.0%}, with LoRA "
                f"{self.rate_with:.0%} ({self.n_seeds} seeds), trained in {self.train_seconds:.1f}s")
        if self.control_with is not None:
            text += f"; on control prompts {self.control_without:.0%} without, {self.control_with:.0%} with"
        return text


def concept_rate(comps, lesson: Lesson, seeds, classifier=None, prompts=None, **sample_kwargs) -> float:
    """Fraction of samples (one per seed, prompts cycled) that the classifier says show `lesson.target`; the
    lesson's own prompts, or `prompts` (e.g. `lesson.controls`)."""
    from .classifier import load_classifier

    classifier = classifier or load_classifier()
    seeds = list(seeds)
    prompts = prompts or lesson.prompts
    prompts = [prompts[i % len(prompts)] for i in range(len(seeds))]
    images = sample(comps, prompts, seeds, **sample_kwargs)
    predicted = classifier.predict(images)[lesson.key]
    return sum(p == lesson.target for p in predicted) / len(seeds)


def prompt_agreement(comps, prompts_scenes: list[dict[str, str]], seeds, classifier=None,
                     **sample_kwargs) -> list[dict]:
    """For each scene description ({"shape", "colour", "background"}), sample "a <colour> <shape> on a <bg>
    background" once per seed and report how often the classifier agrees on shape, colour and both."""
    from .classifier import load_classifier

    classifier = classifier or load_classifier()
    seeds = list(seeds)
    prompts = [f"{'an' if d['colour'][0] in 'aeiou' else 'a'} {d['colour']} {d['shape']} on a {d['background']} "
               "background" for d in prompts_scenes]
    # one batched sampling call for every (prompt, seed) pair
    pred = classifier.predict(sample(comps, [p for p in prompts for _ in seeds], seeds * len(prompts),
                                     **sample_kwargs))
    rows = []
    for i, (prompt, d) in enumerate(zip(prompts, prompts_scenes)):
        part = slice(i * len(seeds), (i + 1) * len(seeds))
        shape_ok = [p == d["shape"] for p in pred["shape"][part]]
        colour_ok = [p == d["colour"] for p in pred["colour"][part]]
        rows.append({"prompt": prompt, "shape": sum(shape_ok) / len(seeds), "colour": sum(colour_ok) / len(seeds),
                     "both": sum(a and b for a, b in zip(shape_ok, colour_ok)) / len(seeds)})
    return rows


def run_lesson(lesson: Lesson | str, config, seeds=range(20), classifier=None, **overrides) -> LessonResult:
    """Train the lesson's LoRA with `lorakit.train(config, **overrides)` and measure the concept rate without and
    with it on the same seeds. `config` is a `TrainConfig` or the path of a TOML such as data_examples/*.toml."""
    from ..config import TrainConfig
    from ..models import load_models
    from ..network import apply_lora_file, remove_lora
    from ..training import train

    lesson = LESSONS[lesson] if isinstance(lesson, str) else lesson
    cfg = TrainConfig.from_toml(config) if isinstance(config, (str, Path)) else config
    cfg = cfg.replace(**{"overwrite": True, **overrides})  # a lesson trains its LoRA afresh each time
    start = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - start
    comps = load_models(cfg.pretrained_model_name_or_path, dtype=torch.float32, device="cpu")

    def rates() -> tuple[float, float | None]:  # (on the lesson's prompts, on its controls)
        controls = concept_rate(comps, lesson, seeds, classifier, prompts=lesson.controls) if lesson.controls else None
        return concept_rate(comps, lesson, seeds, classifier), controls

    rate_without, control_without = rates()
    apply_lora_file(comps, result.lora_path)
    rate_with, control_with = rates()
    remove_lora(comps)
    return LessonResult(lesson.name, rate_without, rate_with, train_seconds, Path(result.lora_path),
                        len(list(seeds)), control_without, control_with)
