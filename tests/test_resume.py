"""Kill-and-resume: a run interrupted and resumed from its saved state ends with exactly the weights of a run that
never stopped (same seed, CPU) — with every source of randomness switched on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file

import lorakit
from lorakit.errors import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


class KillAt:
    """Simulates Colab disconnecting: the run dies right after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, info):
        if info.step == self.step:
            raise Killed


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    d = root / "1_sks toy"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.uniform(0, 255, (64, 80, 3)).astype(np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"sks toy, item {i}, red, blue")
    return root


def settings(tiny_sd1_dir, data, out) -> dict:
    # every source of randomness on: augmentations, caption shuffling/dropout, LoRA dropout (global RNG), VAE
    # sampling every step (uncached latents), offset noise; gradient accumulation across a partial last batch
    return dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data), output_dir=str(out),
                cache_latents=False, flip_aug=True, random_crop=True, shuffle_caption=True, keep_tokens=1,
                caption_dropout_rate=0.3, network_dropout=0.1, noise_offset=0.1, gradient_accumulation_steps=2,
                learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=1, max_train_steps=7,
                save_state=True, save_every_n_steps=2, save_precision="float", sample_at_end=False, seed=1234)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_sd1_dir, dataset):
    # 5 batches per epoch, accumulation 2 -> steps of 2, 2, 1 batches: 3 steps per epoch, 7 steps = 3 epochs
    full = lorakit.train(**settings(tiny_sd1_dir, dataset, tmp_path / "full"))
    assert full.steps == 7 and full.epochs == 3

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(5), **settings(tiny_sd1_dir, dataset, out))
    assert (out / "state-latest.txt").read_text().strip() == "state-00000004"  # saved mid-epoch (epoch 2)
    (out / ".state-00000006.k2j_9xq1").mkdir()  # what a kill in the middle of writing a state leaves
    (out / ".state-00000006.k2j_9xq1" / "lora_params.safetensors").write_bytes(b"half")
    (out / ".lora-step00000006.safetensors.abcdefgh.tmp").write_bytes(b"half")
    resumed = lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out))
    assert resumed.steps == 7
    assert not list(out.glob(".*")), "an interrupted run's unfinished files are removed"

    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    assert any(t.abs().sum() > 0 for k, t in a.items() if k.endswith("lora_up.weight"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in resumed.loss_history] == [r["loss"] for r in full.loss_history]


def test_a_resumed_run_shows_its_earlier_samples_and_losses(tmp_path, tiny_sd1_dir, dataset):
    """After a disconnect, the resumed run's samples_grid.png and `sample_paths` cover the whole run (the same grid as
    a run that never stopped), and `on_resume` hands a notebook's live view the losses and samples so far. Another
    run's PNGs left in samples/, and rounds drawn from prompts edited since, are not shown as this run's."""
    from lorakit.live import LiveView

    prompts = tmp_path / "p.txt"
    prompts.write_text("sks toy --s 1 --w 32 --h 32\nitem --s 1 --w 32 --h 32 --d 5\n")
    kw = {**settings(tiny_sd1_dir, dataset, tmp_path / "full"), "sample_prompts": str(prompts),
          "sample_every_n_steps": 1, "sample_at_end": True}
    full = lorakit.train(**kw)
    out = tmp_path / "killed"
    kw["output_dir"] = str(out)
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(5), **kw)
    stranger = Image.open(out / "samples" / "000002_00.png")
    info = PngImagePlugin.PngInfo()
    for k, v in {**stranger.info, "lorakit_session": "1"}.items():
        info.add_text(k, str(v))
    stranger.save(out / "samples" / "000003_05.png", pnginfo=info)  # another run's image, in this run's names
    seen = {}

    class Recorder:
        def on_resume(self, step, loss_history, samples):
            seen.update(step=step, losses=[r["loss"] for r in loss_history], steps=[s["step"] for s in samples])

    view = LiveView(display=False)
    resumed = lorakit.train(resume="latest", callbacks=[Recorder(), view], **kw)
    assert seen == {"step": 4, "losses": [r["loss"] for r in full.loss_history[:4]], "steps": [1, 2, 3, 4]}
    assert view.steps == list(range(1, 8)) and view.losses == [r["loss"] for r in full.loss_history]
    assert sorted(view.samples) == list(range(1, 8))
    assert [p.name for p in resumed.sample_paths] == [p.name for p in full.sample_paths]
    assert np.array_equal(np.asarray(Image.open(resumed.samples_grid)), np.asarray(Image.open(full.samples_grid)))

    # the prompt file edited before resuming again: the rounds of the old prompts are left out of the new grid
    prompts.write_text("sks toy, edited --s 1 --w 32 --h 32\n")
    (out / "state-latest.txt").write_text("state-00000006")
    again = lorakit.train(resume="latest", **kw)
    assert [p.name for p in again.sample_paths] == ["000007_00.png"]


def test_resume_across_an_epoch_boundary(tmp_path, tiny_sd1_dir, dataset):
    kw = settings(tiny_sd1_dir, dataset, tmp_path / "full")
    kw.update(save_every_n_steps=None, save_every_n_epochs=1, max_train_steps=5)
    full = lorakit.train(**kw)
    kw["output_dir"] = str(tmp_path / "killed")
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(4), **kw)
    assert (tmp_path / "killed" / "state-latest.txt").read_text().strip() == "state-00000003"
    resumed = lorakit.train(resume="latest", **kw)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_state_says_what_to_do(tmp_path, tiny_sd1_dir, dataset):
    with pytest.raises(TrainingError, match="save_state = true"):
        lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, tmp_path / "none"))
    with pytest.raises(TrainingError, match="not a state folder"):
        lorakit.train(resume=str(tmp_path), **settings(tiny_sd1_dir, dataset, tmp_path / "none"))


def test_user_interrupt_saves_lora_and_state(tmp_path, tiny_sd1_dir, dataset):
    class StopButton:
        def on_step(self, info):
            if info.step == 2:
                raise KeyboardInterrupt

    kw = settings(tiny_sd1_dir, dataset, tmp_path / "full")
    kw.update(save_every_n_steps=None, max_train_steps=3)
    full = lorakit.train(**kw)
    kw["output_dir"] = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        lorakit.train(callbacks=StopButton(), **kw)
    assert (tmp_path / "stopped" / "lora-interrupted.safetensors").is_file()
    assert (tmp_path / "stopped" / "state-latest.txt").read_text().strip() == "state-00000002"
    resumed = lorakit.train(resume="latest", **kw)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_between_two_micro_batches_resumes_exactly(tmp_path, tiny_sd1_dir, dataset, monkeypatch):
    """The stop button pressed inside an accumulated step (its first micro-batch done, with LoRA dropout drawing
    from the global generator): the state rewinds to the last optimizer step, its random numbers too."""
    from lorakit.data.dataset import TrainDataset

    kw = {**settings(tiny_sd1_dir, dataset, tmp_path / "full"), "save_every_n_steps": None, "max_train_steps": 3}
    full = lorakit.train(**kw)
    real, armed = TrainDataset.load, [True]

    def load(self, indices, epoch, position, augment=True):
        if armed[0] and augment and (epoch, position) == (0, 3):  # the 2nd micro-batch of step 2
            armed[0] = False
            raise KeyboardInterrupt
        return real(self, indices, epoch, position, augment)

    monkeypatch.setattr(TrainDataset, "load", load)
    kw["output_dir"] = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        lorakit.train(**kw)
    resumed = lorakit.train(resume="latest", **kw)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_while_sampling_at_an_epochs_end_keeps_that_epochs_save(tmp_path, tiny_sd1_dir, dataset):
    """Saves come before samples: the stop button pressed while an epoch's samples are drawn leaves the epoch's
    LoRA and state written."""
    class StopWhileSampling:
        def on_sample(self, step, images, prompts, paths):
            raise KeyboardInterrupt

    prompts = tmp_path / "p.txt"
    prompts.write_text("sks toy --s 1\n")
    kw = {**settings(tiny_sd1_dir, dataset, tmp_path / "out"), "save_every_n_steps": None,
          "save_every_n_epochs": 1, "sample_every_n_epochs": 1, "sample_prompts": str(prompts)}
    with pytest.raises(KeyboardInterrupt):
        lorakit.train(callbacks=StopWhileSampling(), **kw)
    assert (tmp_path / "out" / "lora-000001.safetensors").is_file()
    assert (tmp_path / "out" / "state-latest.txt").read_text().strip() == "state-00000003"


def test_resume_auto_continues_after_a_disconnect_and_starts_fresh_without_a_state(tmp_path, tiny_sd1_dir, dataset,
                                                                                   capsys):
    """A notebook run again after a disconnect: `resume = auto` starts a new run when there is no state and continues
    the saved one when there is; a run that does not resume over a saved state says so."""
    full = lorakit.train(**settings(tiny_sd1_dir, dataset, tmp_path / "full"))
    out = tmp_path / "colab"
    with pytest.raises(Killed):
        lorakit.train(resume="auto", callbacks=KillAt(5), **settings(tiny_sd1_dir, dataset, out))
    assert "no saved state" in capsys.readouterr().out
    resumed = lorakit.train(resume="auto", **settings(tiny_sd1_dir, dataset, out))
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "state-00000004" in printed and "`resume = 'none'` to start over" in printed
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = lorakit.train(resume="auto", **settings(tiny_sd1_dir, dataset, out))  # finished: nothing left to do
    assert "nothing left to train" in capsys.readouterr().out
    assert all(torch.equal(a[k], t) for k, t in load_file(str(again.lora_path)).items())
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"already holds an earlier run \(lora.safetensors\): set `resume = latest` "
                                          r"to continue it, `overwrite = true` to replace it"):
        lorakit.train(**{**settings(tiny_sd1_dir, dataset, out), "max_train_steps": 1})
    lorakit.train(**{**settings(tiny_sd1_dir, dataset, out), "max_train_steps": 1, "overwrite": True})
    assert "holds a saved state (state-00000007) that this run does not continue" in capsys.readouterr().out
    # a run that replaces another and is killed before its first save: `auto` starts afresh, not in the old run
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(1), **{**settings(tiny_sd1_dir, dataset, out), "overwrite": True})
    from lorakit.train_state import saved_state_in

    assert saved_state_in(out) is None and (out / "state-00000001").is_dir()  # kept, not pointed at
    capsys.readouterr()
    lorakit.train(resume="auto", **{**settings(tiny_sd1_dir, dataset, out), "overwrite": True})
    assert "no saved state" in capsys.readouterr().out


def test_resume_refuses_a_state_saved_over_other_batches(tmp_path, tiny_sd1_dir, dataset):
    """The saved position (epoch, batches done) means something only over the same batches: a changed dataset or
    batch setting is refused by name instead of silently continuing somewhere else."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(3), **settings(tiny_sd1_dir, dataset, out))
    (dataset / "1_sks toy" / "9.png").write_bytes((dataset / "1_sks toy" / "0.png").read_bytes())
    with pytest.raises(TrainingError, match=r"cannot resume from .*state-00000002: since it was saved, images '\w+ "
                                            r"\(5 draws\)' → '\w+ \(6 draws\)'; batches per epoch 5 → 6"):
        lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out))
    (dataset / "1_sks toy" / "9.png").unlink()
    # the same names, other pixels (another dataset copied over, inverted images)
    original = (dataset / "1_sks toy" / "4.png").read_bytes()
    Image.new("RGB", (80, 64), "white").save(dataset / "1_sks toy" / "4.png")
    with pytest.raises(TrainingError, match=r"since it was saved, images '\w+ \(5 draws\)' → '\w+ \(5 draws\)'"):
        lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out))
    (dataset / "1_sks toy" / "4.png").write_bytes(original)
    with pytest.raises(TrainingError, match="gradient_accumulation_steps 2 → 1"):
        lorakit.train(resume="latest", **{**settings(tiny_sd1_dir, dataset, out), "gradient_accumulation_steps": 1})
    assert lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out)).steps == 7


def test_resume_refuses_a_state_saved_with_other_training_options(tmp_path, tiny_sd1_dir, dataset):
    """Run again with a new learning rate or alpha, a saved state would continue under the old optimizer's rates
    while the file claims the new ones: refused by name. How long it trains, and what it saves and samples, may
    change."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(3), **settings(tiny_sd1_dir, dataset, out))
    for change, words in [({"learning_rate": 1e-5}, "learning_rate 0.001 → 1e-05"),
                          ({"network_alpha": 1.0}, "network_alpha 8.0 → 1.0"),
                          ({"optimizer_type": "Lion"}, "optimizer_type 'AdamW' → 'Lion'")]:
        with pytest.raises(TrainingError, match=f"cannot resume from .*state-00000002: it was saved with other "
                                                f"training options \\({words}\\).*`resume = 'none'`"):
            lorakit.train(resume="auto", **{**settings(tiny_sd1_dir, dataset, out), **change})
    longer = lorakit.train(resume="latest", **{**settings(tiny_sd1_dir, dataset, out), "max_train_steps": 8,
                                              "save_every_n_steps": 3, "sample_at_end": True,
                                              "network_weights": str(out / "lora-step00000002.safetensors")})
    assert longer.steps == 8 and longer.sample_paths


def test_seed_none_draws_a_seed_that_is_saved_and_kept_on_resume(tmp_path, tiny_sd1_dir, dataset, capsys):
    import re

    kw = {**settings(tiny_sd1_dir, dataset, tmp_path / "run"), "seed": None}
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(3), **kw)
    seed = int(re.search(r"this run uses seed (\d+) \(saved with the run", capsys.readouterr().out)[1])
    resumed = lorakit.train(resume="latest", **kw)
    assert f"this run uses seed {seed} (the resumed state's)" in capsys.readouterr().out
    full = lorakit.train(**{**kw, "seed": seed, "output_dir": str(tmp_path / "full")})
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from safetensors import safe_open

    with safe_open(str(resumed.lora_path), framework="pt") as f:
        assert f.metadata()["ss_seed"] == str(seed)


def test_a_state_saved_again_at_its_step_is_replaced_atomically(tmp_path, monkeypatch):
    """A step saved twice (a step save and an epoch save together, a stop right after a save): the old folder
    stays whole until the new one is in place; a failure keeps it, and after a kill between the two renames,
    `resume = latest` finds it again."""
    import os

    from lorakit import train_state
    from lorakit.train_state import find_state, load_state, save_state

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def save(value):
        with torch.no_grad():
            p.fill_(value)
        return save_state(tmp_path, params={"p": p}, optimizer=opt, scheduler=sched, step=4, epoch=0,
                          batches_done=4, loss_history=[{"loss": value}])

    folder = save(1.0)
    real = os.replace

    def failing(src, dst):
        if Path(dst) == folder and ".old." not in str(src):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(train_state.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        save(2.0)
    monkeypatch.setattr(train_state.os, "replace", real)
    assert load_state(find_state("latest", tmp_path)).loss_history == [{"loss": 1.0}]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["state-00000004", "state-latest.txt"]
    save(3.0)
    assert load_state(find_state("latest", tmp_path)).params["p"].tolist() == [3.0] * 3
    killed = tmp_path / ".state-00000004.old.x"  # as a kill between the two renames leaves it
    killed.mkdir()
    real(folder, killed / folder.name)
    assert load_state(find_state("latest", tmp_path)).params["p"].tolist() == [3.0] * 3


def test_a_state_folder_of_another_tool_is_named_as_such(tmp_path):
    """sd-scripts saves accelerate's files (optimizer.bin, random_states_0.pkl, ...): refused, saying so and what
    to do; any other folder is not a state folder."""
    from lorakit.train_state import find_state

    theirs = tmp_path / "last-state"
    theirs.mkdir()
    for name in ("optimizer.bin", "random_states_0.pkl", "scheduler.bin", "model.safetensors"):
        (theirs / name).write_bytes(b"x")
    with pytest.raises(TrainingError, match="saved by sd-scripts .* start a new run from the LoRA saved with it"):
        find_state(str(theirs), tmp_path)
    with pytest.raises(TrainingError, match="is not a state folder written by `save_state`"):
        find_state(str(tmp_path), tmp_path)


def test_a_damaged_or_lost_state_pointer_and_a_damaged_state(tmp_path, tiny_sd1_dir, dataset, capsys):
    """On Drive a sync can lose `state-latest.txt` or damage a state: `latest` then takes the state of the highest
    step, never a folder outside the run's; a damaged state is named, with the one before it to resume from."""
    import shutil

    out = tmp_path / "run"
    with pytest.raises(Killed):
        lorakit.train(callbacks=KillAt(5), **settings(tiny_sd1_dir, dataset, out))  # states at steps 2 and 4
    other = tmp_path / "other"
    shutil.copytree(out, other)
    pointer = out / "state-latest.txt"
    for damage in (b"\x00\xff\xfegarbage\n", b"", b"../other/state-00000004\n", None):
        pointer.unlink()
        if damage is not None:
            pointer.write_bytes(damage)
        from lorakit.train_state import find_state

        assert find_state("latest", out) == find_state("auto", out) == out / "state-00000004"
        assert "resuming from the state of the highest step, state-00000004" in capsys.readouterr().out
    state = out / "state-00000004"
    for name, damage in (("train_state.pt", b""), ("lora_params.safetensors", b"\x10\x00")):
        kept = (state / name).read_bytes()
        (state / name).write_bytes(damage)
        with pytest.raises(TrainingError, match=rf"the state .*state-00000004 is damaged \(.+\); resume from the "
                                                rf"one before it: `resume = \"{out / 'state-00000002'}\"`"):
            lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out))
        (state / name).write_bytes(kept)
    (state / "config.toml").unlink()  # the options cannot be compared: said, and the run goes on
    assert lorakit.train(resume="latest", **settings(tiny_sd1_dir, dataset, out)).steps == 7
    assert "has no readable config.toml, so this run's options cannot be checked" in capsys.readouterr().out
