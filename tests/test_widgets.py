"""Forms built from the config schemas (ipywidgets' Python API; the browser test drives the same forms in a page)."""

from __future__ import annotations

import ipywidgets as w
import pytest

from lorakit import widgets
from lorakit.config import JOB_CONFIGS, TrainConfig
from lorakit.errors import ConfigError
from lorakit.presets import PRESETS, apply_preset


def all_children(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from all_children(child)


@pytest.mark.parametrize("job", sorted(JOB_CONFIGS))
def test_a_widget_per_field_and_defaults_round_trip(job):
    cls = JOB_CONFIGS[job]
    form = widgets.form(cls)
    assert isinstance(form, widgets.Form)
    names = [s.name for s in cls.specs()]
    assert list(form.fields) == names
    shown = set(map(id, all_children(form.widget)))
    for name, field in form.fields.items():
        assert id(field.widget) in shown, f"{name} is not in the displayed form"
        assert field.widget.description == name
    if all(s.default is not None or s.optional for s in cls.specs()):
        assert form.value.to_dict(include_secrets=True) == cls.from_dict({}).to_dict(include_secrets=True)


def test_widget_kinds_follow_the_schema():
    form = widgets.form(TrainConfig)
    f = form.fields
    assert isinstance(f["network_dim"].widget, w.IntText)
    assert isinstance(f["learning_rate"].widget, w.FloatText)
    assert isinstance(f["flip_aug"].widget, w.Checkbox)
    assert isinstance(f["optimizer_type"].widget, w.Dropdown)
    assert [v for _, v in f["optimizer_type"].widget.options] == list(TrainConfig.spec("optimizer_type").choices)
    assert isinstance(f["v2"].widget, w.Dropdown) and f["v2"].widget.value is None  # auto-detected unless set
    assert isinstance(f["train_data_dir"].widget, w.Text)
    assert "Training images" in f["train_data_dir"].help.value  # help text shown next to the widget
    assert "≥ 1" in f["network_dim"].help.value and "≤ 1024" in f["network_dim"].help.value
    push = widgets.form(JOB_CONFIGS["push"])
    assert isinstance(push.fields["token"].widget, w.Password)


def test_basic_fields_first_and_groups_collapsed():
    form = widgets.form(TrainConfig)
    basic = [s.name for s in TrainConfig.specs() if s.basic]
    boxes = list(form.widget.children)
    first_fields = [b.children[0].description for b in boxes if isinstance(b, w.HBox)
                    and isinstance(b.children[0], w.ValueWidget) and b.children[0].description in form.fields]
    assert first_fields[: len(basic)] == basic
    assert form.sections.selected_index is None  # collapsed
    groups = {s.group for s in TrainConfig.specs() if not s.basic}
    assert len(form.sections.children) == len(groups)
    assert all(any(t.startswith(g + " (") for t in form.sections.titles) for g in groups)


def test_set_values_and_read_the_config_back():
    form = widgets.form(TrainConfig)
    values = dict(network_dim=4, network_alpha=2.0, learning_rate=3e-4, flip_aug=True, optimizer_type="Lion",
                  resolution="96,64", v2=False, max_train_steps=None, max_train_epochs=3, train_data_dir="data/x",
                  network_args=["conv_dim=4", "conv_alpha=1"], unet_lr=2e-4)
    form.set(**values)
    cfg = form.value
    assert isinstance(cfg, TrainConfig)
    for k, v in values.items():
        assert getattr(cfg, k) == v, k
    again = widgets.form(TrainConfig).load(cfg)
    assert again.value.to_dict() == cfg.to_dict()


def test_typing_into_the_widgets_gives_typed_values():
    form = widgets.form(TrainConfig)
    form.fields["conv_dim"].widget.value = " 8 "
    form.fields["network_args"].widget.value = "conv_dim=8, conv_alpha=4"
    form.fields["seed"].widget.value = ""
    form.fields["lr_warmup_steps"].widget.value = "0.05"  # a fraction of the steps; "100" would be 100 steps
    cfg = form.value
    assert cfg.conv_dim == 8 and cfg.network_args == ["conv_dim=8", "conv_alpha=4"] and cfg.seed is None
    assert cfg.lr_warmup_steps == 0.05
    form.fields["lr_warmup_steps"].widget.value = "100"
    assert form.value.lr_warmup_steps == 100 and type(form.value.lr_warmup_steps) is int
    assert form.error == ""


@pytest.mark.parametrize("field,value,words", [
    ("network_dim", 0, ["network_dim", "≥ 1", "0"]),
    ("network_dropout", 1.5, ["network_dropout", "≤ 0.99"]),
    ("conv_dim", "many", ["conv_dim", "integer", "many"]),
    ("resolution", "big", ["resolution", "W,H"]),
])
def test_invalid_values_show_the_error_next_to_the_form(field, value, words):
    form = widgets.form(TrainConfig)
    form.fields[field].widget.value = value
    for word in words:
        assert word in form.error
    assert "lorakit-error" in form.errors.value and "Traceback" not in form.errors.value
    assert form.fields["network_dim"].widget.value == (0 if field == "network_dim" else 16)  # never clamped
    with pytest.raises(ConfigError):
        _ = form.value
    clicked = []
    form.on_submit = clicked.append
    form.run_button.click()
    assert clicked == [] and field in form.error


def test_contradictions_are_shown_too():
    form = widgets.form(TrainConfig)
    form.set(network_train_unet_only=True, network_train_text_encoder_only=True)
    assert "cannot both be set" in form.error
    form.set(network_train_text_encoder_only=False)
    assert form.error == ""


def test_button_click_runs_the_job_with_the_form_config():
    runs = []
    form = widgets.form(TrainConfig, on_submit=lambda cfg: runs.append(cfg) or "trained")
    form.fields["network_dim"].widget.value = 12
    form.run_button.click()
    assert len(runs) == 1 and runs[0].network_dim == 12
    assert form.result == "trained" and form.error == ""
    assert not form.run_button.disabled


@pytest.mark.parametrize("use_widgets", [True, False])
def test_the_result_of_a_form_that_did_not_run_is_a_clear_error(use_widgets):
    """The cells after a stopped training read `form.result.lora_path`: one line saying why, not an AttributeError
    on None, and never the result of an earlier run."""
    outcome = ["trained"]

    def job(cfg):
        if not outcome:
            raise ConfigError("`train_data_dir` does not exist")
        return outcome.pop()

    form = widgets.form(TrainConfig, on_submit=job, use_widgets=use_widgets)
    with pytest.raises(ConfigError, match="the train form has no result: it has not run yet, or its last run stopped"):
        _ = form.result
    assert form.submit() == "trained" and form.result == "trained"
    with pytest.raises(ConfigError, match="does not exist"):
        form.submit()
    with pytest.raises(ConfigError, match="has no result"):
        _ = form.result


def test_job_errors_from_the_button_are_one_line_next_to_the_form(tmp_path):
    from lorakit.errors import DatasetError

    def job(cfg):
        raise DatasetError(f"`train_data_dir` {cfg.train_data_dir!r} does not exist")

    form = widgets.form(TrainConfig, values=dict(train_data_dir=str(tmp_path / "missing")), on_submit=job)
    form.run_button.click()  # must not raise out of the click handler
    assert "does not exist" in form.error and "missing" in form.error
    with pytest.raises(DatasetError):  # from a cell, submit() stops "Run all"
        form.submit()


def test_a_fault_in_the_job_is_shown_and_the_form_says_stopped(tmp_path):
    def job(cfg):
        raise RuntimeError("a fault, not bad input")

    form = widgets.form(TrainConfig, values=dict(train_data_dir=str(tmp_path)), on_submit=job)
    with pytest.raises(RuntimeError, match="a fault"):
        form.submit()
    assert form.status.value == "stopped"
    with pytest.raises(ConfigError, match="`output_dir` is empty: set it"):
        TrainConfig(train_data_dir=str(tmp_path), output_dir=" ")
    with pytest.raises(ConfigError, match="`pretrained_model_name_or_path` is empty: set it"):
        TrainConfig(train_data_dir=str(tmp_path), pretrained_model_name_or_path="")


def test_drive_path_off_colab_is_a_clear_message():
    form = widgets.form(TrainConfig, values=dict(train_data_dir="/content/drive/MyDrive/data"),
                        on_submit=lambda cfg: pytest.fail("must not run"))
    form.run_button.click()
    assert "Google Drive" in form.error and "train_data_dir" in form.error and "not Colab" in form.error


def test_presets_fill_the_form_and_keep_other_fields():
    form = widgets.form(TrainConfig, values=dict(train_data_dir="my/data"))
    form.preset.value = "SD1.5 character, T4"
    cfg = form.value
    assert cfg.mixed_precision == "fp16" and cfg.train_data_dir == "my/data"
    # 3.7 GiB of a T4's 15 without them: neither checkpointing (1.7× slower) nor an 8-bit optimizer's extra install
    assert not cfg.gradient_checkpointing and cfg.optimizer_type == "AdamW"
    assert cfg.enable_bucket  # photos of any shape trained whole, not cropped to 512x512
    form.preset.value = "workshop (CPU, toy model)"
    assert form.value.pretrained_model_name_or_path == "lorakit-toy" and form.value.mixed_precision == "no"
    for name in PRESETS["train"]:
        assert isinstance(apply_preset(name), TrainConfig)  # every preset is valid for the schema
        assert isinstance(form.value, TrainConfig)
    with pytest.raises(ConfigError, match="known presets"):
        widgets.form(TrainConfig, preset="no such preset")


def test_toml_save_and_load_from_the_form(tmp_path):
    path = tmp_path / "my.toml"
    form = widgets.form(TrainConfig)
    form.set(network_dim=6, output_name="x", resolution="128")
    form.toml_path.value = str(path)
    form.save_button.click()
    assert TrainConfig.from_toml(path).network_dim == 6
    other = widgets.form(TrainConfig)
    other.toml_path.value = str(path)
    other.load_button.click()
    assert other.value.to_dict() == form.value.to_dict()
    path.write_text("network_dimm = 3\n")
    other.load_button.click()
    assert "network_dimm" in other.error and "network_dim" in other.error
    form.toml_path.value = str(tmp_path)  # a folder: named as one, with a file name to give
    form.save_button.click()
    assert f"{tmp_path} is a folder: give the TOML file's name (e.g. {tmp_path / 'train.toml'})" in form.error


def test_static_form_without_widgets_uses_the_parameters():
    calls = []
    form = widgets.form(TrainConfig, preset="workshop (CPU, toy model)", values=dict(max_train_steps=7),
                        on_submit=calls.append, use_widgets=False)
    assert isinstance(form, widgets.StaticForm) and form.widget is None
    assert form.value.max_train_steps == 7 and form.value.pretrained_model_name_or_path == "lorakit-toy"
    form.submit()
    assert calls[0].max_train_steps == 7
    assert "max_train_steps = 7" in repr(form)
    bad = widgets.form(TrainConfig, values=dict(network_dim=-1), use_widgets=False)
    assert "network_dim" in repr(bad)


def test_switching_presets_carries_nothing_over_but_what_the_user_typed():
    """Each preset fills the form as defaults ← preset ← notebook values; the previous preset's values (device,
    optimizer, caption options) do not stay behind, and a field typed by the user does."""
    values = dict(train_data_dir="my/data", output_name="sks_shape")
    for first in PRESETS["train"]:
        for second in PRESETS["train"]:
            form = widgets.form(TrainConfig, preset=first, values=values)
            form.preset.value = second
            fresh = widgets.form(TrainConfig, preset=second, values=values)
            assert form.value.to_dict() == fresh.value.to_dict(), (first, second)
    form = widgets.form(TrainConfig, preset="workshop (CPU, toy model)", values=values)
    form.set(learning_rate=3e-4)  # typed by the user
    form.preset.value = "SD1.5 character, T4"
    assert form.value.learning_rate == 3e-4 and form.value.output_name == "sks_shape"


def test_what_was_changed_in_the_form_is_put_back_when_run_all_makes_it_again(tmp_path, monkeypatch, capsys):
    """Colab keeps no widget state: after a disconnect, "Run all" rebuilt the form from the parameters cell and
    trained with its values, not the ones the run was started with. A form made with `remember` puts back the
    preset and values changed in it before it last ran — unless the parameters cell changed since (it wins)."""
    monkeypatch.chdir(tmp_path)
    ran = []
    params = dict(train_data_dir="my/data", output_dir="output/db", resume="auto")

    def make(values=params):
        return widgets.form(TrainConfig, preset="workshop (CPU, toy model)", values=values,
                            on_submit=lambda cfg: ran.append(cfg) or cfg, remember="dreambooth", use_widgets=True)

    first = make()
    first.preset.value = "SD1.5 character, T4"
    first.set(network_dim=24, train_data_dir="/data/me")
    first.submit()
    again = make()  # Run all after the disconnect
    assert "restored the preset and 2 value(s) changed in this form before it last ran" in capsys.readouterr().out
    cfg = again.submit()
    assert (cfg.network_dim, cfg.train_data_dir, cfg.mixed_precision, cfg.output_dir) == (24, "/data/me", "fp16",
                                                                                          "output/db")
    assert again.preset.value == "SD1.5 character, T4"
    assert cfg == ran[0]
    # the parameters cell was edited since: its values win, the form's earlier changes are not applied
    edited = make(dict(params, output_dir="output/other"))
    workshop = apply_preset("workshop (CPU, toy model)").network_dim
    assert (edited.value.network_dim, edited.value.train_data_dir, edited.preset.value) == (
        workshop, "my/data", "workshop (CPU, toy model)") and workshop != 24
    # a run refused for bad input (the T4 preset on a CPU) is not remembered: Run-all would repeat the mistake
    def refuse(cfg):
        raise ConfigError("`mixed_precision = fp16` needs a CUDA GPU")

    refused = widgets.form(TrainConfig, preset="workshop (CPU, toy model)", values=params, remember="dreambooth",
                           on_submit=refuse, use_widgets=True)
    capsys.readouterr()
    refused.set(network_dim=40)
    with pytest.raises(ConfigError):
        refused.submit()
    assert make().value.network_dim == 24  # what the last run that started was given
    widgets.memory_path("dreambooth").unlink()
    first_try = widgets.form(TrainConfig, values=params, remember="dreambooth", use_widgets=True, on_submit=refuse)
    first_try.set(network_dim=40)
    with pytest.raises(ConfigError):
        first_try.submit()
    assert not widgets.memory_path("dreambooth").exists()
    # without `remember`, nothing is kept
    plain = widgets.form(TrainConfig, preset="workshop (CPU, toy model)", values=params, use_widgets=True)
    assert plain.value.network_dim == workshop


def test_a_remembered_push_form_keeps_no_token(tmp_path, monkeypatch):
    from lorakit.config import PushConfig

    monkeypatch.chdir(tmp_path)
    f = widgets.form(PushConfig, values=dict(output_dir="out"), on_submit=lambda cfg: None, remember="push",
                     use_widgets=True)
    f.set(repo_id="me/lora", token="hf_" + "x" * 30)
    f.submit()
    text = widgets.memory_path("push").read_text()
    assert "me/lora" in text and "hf_" not in text
