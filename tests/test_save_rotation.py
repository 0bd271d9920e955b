"""Keeping only the latest intermediate saves (sd-scripts' save_last_n_epochs / save_last_n_steps)."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.save_rotation import prune_saves


def make(folder, names, states=()):
    for name in names:
        (folder / name).write_bytes(b"x")
    for step, tag in states:
        state = folder / f"state-{step:08d}"
        state.mkdir()
        (state / "saved_with.txt").write_text(tag + "\n")


def test_epoch_saves_keep_the_newest_n_and_step_saves_the_last_n_steps(tmp_path):
    make(tmp_path, ["lo[ra]-000001.safetensors", "lo[ra]-000002.safetensors", "lo[ra]-000003.safetensors",
                    "lo[ra]-step00000100.safetensors", "lo[ra]-step00000200.safetensors",
                    "lo[ra]-step00000300.safetensors", "lo[ra]-interrupted.safetensors", "lo[ra].safetensors",
                    "other-000001.safetensors"],
         states=[(100, "step00000100"), (150, "000001"), (200, "step00000200"), (300, "step00000300"),
                 (310, "000002"), (400, "interrupted")])
    (tmp_path / "state-00000050").mkdir()  # no saved_with.txt (an older lorakit): never deleted
    (tmp_path / "state-latest.txt").write_text("state-00000150\n")  # the latest state is always kept
    deleted = prune_saves(tmp_path, "lo[ra]", "safetensors", step=300, last_n_epochs=2, last_n_steps=150)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["lo[ra]-000002.safetensors", "lo[ra]-000003.safetensors", "lo[ra]-interrupted.safetensors",
                    "lo[ra]-step00000200.safetensors", "lo[ra]-step00000300.safetensors", "lo[ra].safetensors",
                    "other-000001.safetensors", "state-00000050", "state-00000150", "state-00000200",
                    "state-00000300", "state-00000310", "state-00000400", "state-latest.txt"]
    assert {p.name for p in deleted} == {"lo[ra]-000001.safetensors", "lo[ra]-step00000100.safetensors",
                                         "state-00000100"}
    # the states' own counts, independent of the LoRAs'
    prune_saves(tmp_path, "lo[ra]", "safetensors", step=300, last_n_steps_state=50)
    assert not (tmp_path / "state-00000200").exists() and (tmp_path / "lo[ra]-step00000200.safetensors").exists()
    (tmp_path / "state-latest.txt").write_text("state-00000400\n")
    prune_saves(tmp_path, "lo[ra]", "safetensors", step=300, last_n_epochs_state=1)
    assert not (tmp_path / "state-00000150").exists() and (tmp_path / "state-00000310").exists()


@pytest.mark.usefixtures("one_thread")
def test_training_deletes_older_saves_and_still_resumes(tmp_path, tiny_sd1_dir):
    from PIL import Image

    data = tmp_path / "data" / "1_sks dog"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    common = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data.parent),
                  output_dir=str(tmp_path / "out"), output_name="dog", save_every_n_steps=1, save_last_n_steps=2,
                  save_state=True, sample_at_end=False)
    lorakit.train(max_train_steps=5, **common)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("dog-step*")) == [f"dog-step0000000{i}.safetensors" for i in (2, 3, 4)]
    assert sorted(p.name for p in out.glob("state-0*")) == [f"state-0000000{i}" for i in (2, 3, 4, 5)]
    result = lorakit.train(max_train_steps=7, resume="latest", **common)  # the kept state continues
    assert result.steps == 7 and result.saved and all(p.is_file() for p in result.saved)
    # step 5 ended the first run (its final LoRA, no step save); at step 6, saves of steps ≥ 4 are kept
    assert sorted(p.name for p in out.glob("dog-step*")) == [f"dog-step0000000{i}.safetensors" for i in (4, 6)]


def test_save_state_on_train_end_and_save_n_epoch_ratio(tmp_path, tiny_sd1_dir):
    """sd-scripts' save_state_on_train_end: one state, at the end (none with the intermediate saves), from which a
    later run resumes; save_n_epoch_ratio = 2 over 4 epochs saves at epochs 2 and 4 (the last is the final LoRA),
    whatever save_every_n_epochs says (as in sd-scripts)."""
    from PIL import Image

    data = tmp_path / "data" / "1_sks dog"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    common = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data.parent),
                  output_dir=str(tmp_path / "out"), output_name="dog", sample_at_end=False)
    lorakit.train(max_train_epochs=4, save_n_epoch_ratio=2, save_every_n_epochs=1, save_state_on_train_end=True,
                  **common)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("dog-*")) == ["dog-000002.safetensors"]
    assert sorted(p.name for p in out.glob("state-0*")) == ["state-00000004"]
    result = lorakit.train(max_train_epochs=5, resume="latest", **common)
    assert result.steps == 5 and result.loss_history[0]["step"] == 1 and len(result.loss_history) == 5


def test_a_run_saving_states_in_a_folder_of_another_run_s_states_is_refused(tmp_path, tiny_sd1_dir):
    """States are named by step, not by run: a run that saves them where another run's are (another
    `output_name`) would replace them, so it is refused, `overwrite` or not; without states it may share the folder."""
    from PIL import Image

    from lorakit.errors import ConfigError

    data = tmp_path / "data" / "1_sks dog"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    common = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data.parent),
                  output_dir=str(tmp_path / "out"), max_train_steps=2, sample_at_end=False)
    lorakit.train(output_name="dog", save_state=True, **common)
    state = (tmp_path / "out" / "state-00000002" / "train_state.pt").read_bytes()
    for kw in ({"save_state": True}, {"save_state_on_train_end": True, "overwrite": True}):
        with pytest.raises(ConfigError, match=r"holds the saved states of another run \(state-00000002: output_name "
                                              r"'dog'\)"):
            lorakit.train(output_name="cat", **kw, **common)
    assert (tmp_path / "out" / "state-00000002" / "train_state.pt").read_bytes() == state
    lorakit.train(output_name="cat", overwrite=True, **common)
    assert (tmp_path / "out" / "cat.safetensors").is_file()
