"""The config schema: one source for CLI, TOML, metadata; errors name the field and the fix."""

from __future__ import annotations

import pytest

from lorakit.cli import main, parse_config
from lorakit.config import JOB_CONFIGS, MergeConfig, TrainConfig, parse_resolution
from lorakit.errors import ConfigError


def test_every_field_has_help_group_and_type():
    for cls in JOB_CONFIGS.values():
        for spec in cls.specs():
            assert spec.help, f"{cls.job}.{spec.name} has no help"
            assert spec.group
            assert spec.type in (bool, int, float, str, list)


def test_defaults_validate_and_roundtrip_through_toml(tmp_path):
    cfg = TrainConfig(train_data_dir="data", network_dim=32)
    path = cfg.save_toml(tmp_path / "train.toml")
    again = TrainConfig.from_toml(path)
    assert again.to_dict() == cfg.to_dict()


def test_cli_overrides_toml(tmp_path):
    (tmp_path / "t.toml").write_text('network_dim = 8\nlearning_rate = 0.001\n[data]\ntrain_data_dir = "x"\n')
    cfg, dry = parse_config(["train", "--config", str(tmp_path / "t.toml"), "--network_dim", "32", "--flip_aug"])
    assert (cfg.network_dim, cfg.learning_rate, cfg.train_data_dir, cfg.flip_aug) == (32, 0.001, "x", True)
    assert not dry


def test_cli_none_unsets_what_the_toml_set(tmp_path):
    (tmp_path / "t.toml").write_text('sample_every_n_steps = 50\nmax_train_epochs = 3\ntrain_data_dir = "x"\n')
    cfg, _ = parse_config(["train", "--config", str(tmp_path / "t.toml"), "--sample_every_n_steps", "none"])
    assert cfg.sample_every_n_steps is None and cfg.max_train_epochs == 3
    cfg, _ = parse_config(["train", "--config", str(tmp_path / "t.toml"), "--max_train_epochs", "None"])
    assert cfg.max_train_epochs is None and cfg.sample_every_n_steps == 50
    with pytest.raises(ConfigError, match=r"`network_dim` must be an integer, got 'none'"):  # not optional
        parse_config(["train", "--network_dim", "none"])


def test_cli_value_errors_say_command_line(tmp_path):
    (tmp_path / "t.toml").write_text("network_dim = 8\n")
    with pytest.raises(ConfigError, match=r"`max_train_steps` must be an integer, got 'abc' \(on the command line\)"):
        parse_config(["train", "--config", str(tmp_path / "t.toml"), "--max_train_steps", "abc"])


def test_cli_lists_and_optional_bools():
    cfg, _ = parse_config(["merge", "--models", "a.safetensors", "b.safetensors", "--ratios", "0.8", "0.5",
                           "--save_to", "m.safetensors", "--v2"])
    assert cfg.models == ["a.safetensors", "b.safetensors"] and cfg.ratios == [0.8, 0.5] and cfg.v2 is True
    assert MergeConfig(models=["a"], save_to="x").v2 is None


@pytest.mark.parametrize("data, words", [
    ({"network_dimm": 4}, ["network_dimm", "network_dim"]),
    ({"network_dim": "many"}, ["network_dim", "integer"]),
    ({"network_dim": 0}, ["network_dim", "≥ 1"]),
    ({"caption_dropout_rate": 1.5}, ["caption_dropout_rate", "≤ 1"]),
    ({"mixed_precision": "fp8"}, ["mixed_precision", "fp16"]),
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, ["network_train_unet_only",
                                                                                  "choose one"]),
    ({"color_aug": True}, ["color_aug", "cache_latents = false"]),
    ({"resolution": "big"}, ["resolution", "W,H"]),
])
def test_bad_values_name_the_field(data, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(data)
    for w in words:
        assert w in str(e.value)


def test_toml_wrong_type_is_an_error(tmp_path):
    (tmp_path / "t.toml").write_text('network_dim = "sixteen"\n')
    with pytest.raises(ConfigError, match=r"network_dim.*t\.toml"):
        TrainConfig.from_toml(tmp_path / "t.toml")


def test_ratios_must_match_models():
    with pytest.raises(ConfigError, match="one ratio per model"):
        MergeConfig(models=["a", "b"], ratios=[1.0], save_to="x")


def test_cli_prints_one_clear_line(capsys, tmp_path):
    (tmp_path / "t.toml").write_text("unknown_key = 1\n")
    assert main(["train", "--config", str(tmp_path / "t.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown option `unknown_key`" in err[0]
    assert main(["train", "--network_train_unet_only", "--network_train_text_encoder_only", "--dry_run"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_dry_run_prints_resolved_toml(capsys):
    assert main(["train", "--network_dim", "4", "--dry_run"]) == 0
    assert "network_dim = 4" in capsys.readouterr().out


def test_secret_fields_never_exported():
    from lorakit.config import PushConfig

    cfg = PushConfig(repo_id="u/r", token="hf_secret123")
    assert "token" not in cfg.to_dict() and "hf_secret123" not in repr(cfg) and "hf_secret123" not in cfg.to_toml()


def test_parse_resolution():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("768,512") == (768, 512)
    assert parse_resolution(None) is None


def test_every_job_has_a_one_line_description():
    """`lorakit --help` lists each job with the first line of its docstring (not a dataclass signature)."""
    for cls in JOB_CONFIGS.values():
        first = (cls.__doc__ or "").strip().splitlines()[0]
        assert first and not first.startswith(cls.__name__ + "("), cls.job


@pytest.mark.parametrize("argv, message", [
    (["train", "--learning", "5e-3"], "unknown option `--learning` for `train`; did you mean `--learning_rate`?"),
    (["train", "--max_train_step", "10"], "did you mean `--max_train_steps`?"),
    (["train", "--netwrok_dim", "8"], "did you mean `--network_dim`?"),
    (["prepare", "repair", "in", "--overwrite"], "unknown option `--overwrite` for `prepare`; did you mean"),
    (["prepare", "check", "a", "b"], "unexpected argument 'b' for `prepare`"),
])
def test_cli_refuses_abbreviations_and_typos_with_a_suggestion(capsys, argv, message):
    """argparse would read `--learning` as `--learning_rate` (a prefix) and `--overwrite` as `--overwrite_captions`:
    a guessed flag must not silently set another option."""
    assert main([*argv, "--dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_positional_options_may_also_be_given_as_flags():
    """Messages name `--input_dir`; the flag works as well as the positional form."""
    cfg, _ = parse_config(["prepare", "check", "--input_dir", "photos"])
    assert (cfg.action, cfg.input_dir) == ("check", "photos")
    cfg, _ = parse_config(["inspect", "--path", "a.safetensors"])
    assert cfg.path == "a.safetensors"


def test_choices_in_another_case_are_read_as_the_schema_spells_them():
    """sd-scripts reads `--optimizer_type adamw8bit`; so does lorakit (and stores `AdamW8bit`)."""
    cfg, _ = parse_config(["train", "--optimizer_type", "adamw8bit", "--lr_scheduler", "Cosine"])
    assert (cfg.optimizer_type, cfg.lr_scheduler) == ("AdamW8bit", "cosine")
    with pytest.raises(ConfigError, match="`optimizer_type` must be one of"):
        parse_config(["train", "--optimizer_type", "adamw9bit"])


def test_a_key_set_twice_across_toml_sections_is_an_error(tmp_path):
    (tmp_path / "t.toml").write_text("learning_rate = 1e-4\n[training]\nlearning_rate = 5e-4\n")
    with pytest.raises(ConfigError, match=r"`learning_rate` is set twice in t.toml \(at the top level and in "
                                          r"\[training\]\)"):
        TrainConfig.from_toml(tmp_path / "t.toml")


def test_sd_scripts_options_that_change_nothing_are_read_with_a_note(tmp_path, capsys):
    """A config brought from sd-scripts often sets data-loader and logging options: they are read with a note, while
    a misspelt option is refused by name, with the closest option."""
    (tmp_path / "t.toml").write_text("network_dim = 8\nmax_data_loader_n_workers = 0\nlogging_dir = 'logs'\n"
                                     "[extra]\nmem_eff_attn = true\n")
    cfg = TrainConfig.from_toml(tmp_path / "t.toml")
    assert cfg.network_dim == 8
    err = capsys.readouterr().err
    assert "note: `max_data_loader_n_workers` (in t.toml) is not used by lorakit: batches are loaded" in err
    assert "`logging_dir`" in err and "`mem_eff_attn`" in err
    (tmp_path / "t.toml").write_text("multires_noise_iterations_typo = 6\n")
    with pytest.raises(ConfigError, match="unknown option `multires_noise_iterations_typo`.*did you mean "
                                          "`multires_noise_iterations`"):
        TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text("max_token_length = 225\nsample_sampler = 'k_euler_a'\n"
                                     "multires_noise_iterations = 6\n")
    cfg = TrainConfig.from_toml(tmp_path / "t.toml")
    assert (cfg.max_token_length, cfg.sample_sampler, cfg.multires_noise_iterations) == (225, "euler_a", 6)


def test_sd_scripts_features_lorakit_lacks_are_read_while_off_and_refused_when_on(tmp_path, capsys):
    """GUI-made sd-scripts configs list every option: those lorakit lacks are fine at their "off" value."""
    (tmp_path / "t.toml").write_text("zero_terminal_snr = false\nscale_weight_norms = 0\nloss_type = 'l2'\n"
                                     "huggingface_token = ''\nnetwork_dim = 4\n")
    assert TrainConfig.from_toml(tmp_path / "t.toml").network_dim == 4
    err = capsys.readouterr().err
    assert "4 sd-scripts option(s) (in t.toml) set to off are not in lorakit: zero_terminal_snr, " in err
    for line, feature, off in [("scale_weight_norms = 1.0", "max-norm regularisation", "0"),
                               ("zero_terminal_snr = true", "zero-terminal-SNR", "false"),
                               ("loss_type = 'huber'", "Huber", '"l2"')]:
        (tmp_path / "t.toml").write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"is set, but lorakit does not have (a )?{feature}.*set it "
                                              f"to {off} \\(off\\)"):
            TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text("validation_split = 0.0\ntorch_compile = false\nmetadata_author = 'me'\n"
                                     "caption_extention = '.caption'\n")  # sd-scripts' own misspelt alias
    assert TrainConfig.from_toml(tmp_path / "t.toml").caption_extension == ".caption"
    (tmp_path / "t.toml").write_text("huggingface_token = 'hf_secret_value'\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(tmp_path / "t.toml")
    assert "hf_secret_value" not in str(info.value) and "lorakit push" in str(info.value)


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    """A file where a folder is expected (or no permission, a full disk) is the user's to fix: no traceback."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    code = main(["prepare", "repair", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "afile" / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "afile") in err[0]
    assert main(["prepare", "repair", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "n"),
                 "--background", "notacolour"]) == 2
    assert "`background` must be a colour name" in capsys.readouterr().err


def test_tiny_never_writes_over_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "model.safetensors").write_text("precious")
    assert main(["tiny", "--output_dir", str(tmp_path / "mymodel")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "mymodel" / "model.safetensors").read_text() == "precious"
