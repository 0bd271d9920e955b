"""Workshop mode: `lorakit-toy`, a tiny pretrained text-to-image model on which a LoRA visibly learns on a CPU.

- `world`: the procedurally drawn world (shapes × colours × fills × backgrounds) and its captions;
- `pretrain`, `release`: how the shipped weights were made (`scripts/pretrain_toy.py`);
- `classifier`: an independent concept classifier, for measuring what a model draws;
- `examples`: the bundled `data_examples/` (`scripts/make_data_examples.py`);
- `sampling`, `lesson`: sample the model and measure a LoRA lesson (`benchmarks/toy_lesson.py`).

The model itself loads through the ordinary loader: `lorakit.load_models("lorakit-toy")`.
"""
