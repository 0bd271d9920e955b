"""The config schema: one source for CLI, TOML, metadata; errors name the field and the fix."""

from __future__ import annotations

import pytest

from lorakit.cli import main, parse_config
from lorakit.config import JOB_CONFIGS, GenerateConfig, MergeConfig, TrainConfig, parse_resolution
from lorakit.config.schema import Number
from lorakit.errors import ConfigError


def test_every_field_has_help_group_and_type():
    for cls in JOB_CONFIGS.values():
        for spec in cls.specs():
            assert spec.help, f"{cls.job}.{spec.name} has no help"
            assert spec.group
            assert spec.type in (bool, int, float, Number, str, list)


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
    # text options too: the messages' `resume = 'none'`, a lesson's regularisation folder left out
    (tmp_path / "t.toml").write_text('train_data_dir = "x"\nreg_data_dir = "reg"\nresume = "auto"\n')
    cfg, _ = parse_config(["train", "--config", str(tmp_path / "t.toml"), "--reg_data_dir", "none", "--resume",
                           "none"])
    assert cfg.reg_data_dir is None and cfg.resume is None and cfg.train_data_dir == "x"
    (tmp_path / "t.toml").write_text("resume = 'none'\n")
    assert TrainConfig.from_toml(tmp_path / "t.toml").resume is None


def test_every_jobs_help_is_printed(capsys):
    """Help texts with a % in them ("5%", "~30% slower") are printed, not an argparse format error."""
    for job in ("train", "merge", "extract", "generate", "prepare", "push", "inspect", "tiny"):
        with pytest.raises(SystemExit) as done:
            main([job, "--help"])
        assert done.value.code == 0, job
        assert "--dry_run" in capsys.readouterr().out, job


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
    ({"learning_rate": float("nan")}, ["learning_rate", "finite number, got nan"]),
    ({"network_alpha": "inf"}, ["network_alpha", "finite number, got inf"]),
    ({"seed": 2**32}, ["seed", "≤ 4294967295"]),
    ({"output_name": ""}, ["output_name", "plain file name"]),
    ({"output_name": "../escaped"}, ["output_name", "plain file name"]),
    ({"output_name": ".hidden"}, ["output_name", "no leading dot"]),
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


def test_a_config_file_not_in_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "t.toml").write_bytes(b'network_dim = 8\noutput_name = "caf\xe9"\n')  # Windows-1252
    with pytest.raises(ConfigError, match=r"config file t\.toml is not UTF-8 text \(byte 0xe9 on line 2\)"):
        TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "bom.toml").write_bytes("\ufeffnetwork_dim = 8\n".encode())  # as Notepad saves it
    assert TrainConfig.from_toml(tmp_path / "bom.toml", {"train_data_dir": "x"}).network_dim == 8


def test_other_jobs_refuse_non_finite_numbers_and_huge_seeds_and_sizes():
    from lorakit.config import GenerateConfig

    for kw, words in [({"guidance_scale": float("nan")}, "finite"), ({"network_mul": [float("inf")]}, "finite"),
                      ({"seed": 10**23}, "≤ 4294967295"), ({"width": 1_000_000}, "≤ 4096")]:
        with pytest.raises(ConfigError, match=words):
            GenerateConfig(prompt="x", **kw)


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


@pytest.mark.parametrize("argv", [["train", "--learning_rate", "--dry_run"], ["trian"], ["train", "--no-flip_aug=1"]])
def test_a_malformed_command_line_is_one_line_not_the_whole_usage(capsys, argv):
    """argparse prints `train`'s 95-line usage before its error; lorakit prints the error and where help is."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: argument" in err[0] and "--help` lists the options" in err[0], err[:3]


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
    (tmp_path / "t.toml").write_text("full_fp16 = false\nfull_bf16 = false\nfp8_base = false\n"
                                     "huggingface_token = ''\nnetwork_dim = 4\n")
    assert TrainConfig.from_toml(tmp_path / "t.toml").network_dim == 4
    err = capsys.readouterr().err
    assert "4 sd-scripts option(s) (in t.toml) set to off are not in lorakit: full_fp16, " in err
    for line, feature, off in [("stop_text_encoder_training = 100", "a step at which the text encoder stops", "0"),
                               ("fp8_base = true", "fp8 base weights", "false"),
                               ("torch_compile = true", "a compiled model", "false")]:
        (tmp_path / "t.toml").write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"is set, but lorakit does not have (a )?{feature}.*set it "
                                              f"to {off} \\(off\\)"):
            TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text("validation_split = 0.0\ntorch_compile = false\nmetadata_author = 'me'\n"
                                     "caption_extention = '.caption'\n")  # sd-scripts' own misspelt alias
    assert TrainConfig.from_toml(tmp_path / "t.toml").caption_extension == ".caption"
    # sd-scripts' SD3/FLUX options, as its newer configs write them at their defaults, and metadata options
    (tmp_path / "t.toml").write_text("weighting_scheme = 'uniform'\nlogit_mean = 0.0\nlogit_std = 1.0\n"
                                     "mode_scale = 1.29\nblocks_to_swap = 0\nmetadata_trigger_phrase = 'sks'\n"
                                     "network_dim = 4\n")
    assert TrainConfig.from_toml(tmp_path / "t.toml").network_dim == 4
    assert "`metadata_trigger_phrase`" in capsys.readouterr().err
    for line, feature in [("weighting_scheme = 'logit_normal'", "SD3/FLUX timestep weighting"),
                          ("use_lion_optimizer = true", "sd-scripts' old Lion switch .set `optimizer_type")]:
        (tmp_path / "t.toml").write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"is set, but lorakit does not have {feature}"):
            TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text("huggingface_token = 'hf_secret_value'\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(tmp_path / "t.toml")
    assert "hf_secret_value" not in str(info.value) and "lorakit push" in str(info.value)


def test_a_pasted_sd_scripts_command_line_is_read_as_its_config_file_would_be(capsys):
    """`train_network.py` flags lorakit has no use for are noted, those of features it lacks are fine while off and
    refused by name when on, sd-scripts' alias is renamed; a misspelt flag is still an error with the closest
    option, and a token's value is never printed."""
    cfg, _ = parse_config(["train", "--network_dim", "8", "--max_data_loader_n_workers", "0", "--log_with=tensorboard",
                           "--caption_extention", ".caption", "--full_bf16", "false", "--fp8_base", "false",
                           "--stop_text_encoder_training=0", "--mem_eff_attn", "--network_args", "conv_dim=4",
                           "conv_alpha=2"])
    assert (cfg.network_dim, cfg.caption_extension, cfg.network_args) == (8, ".caption", ["conv_dim=4",
                                                                                           "conv_alpha=2"])
    err = capsys.readouterr().err
    assert "note: `max_data_loader_n_workers` (on the command line) is not used by lorakit" in err
    assert "`log_with`" in err and "`mem_eff_attn`" in err
    assert "3 sd-scripts option(s) (on the command line) set to off are not in lorakit: full_bf16, " in err
    for argv, words in [(["--fp8_base"], "fp8 base weights.*set it to false"),
                        (["--stop_text_encoder_training", "100"], "text encoder stops training.*set it to 0"),
                        (["--full_bf16"], "bf16 LoRA weights.*set it to false"),
                        (["--learnin", "1"], "unknown option `--learnin` for `train`; did you mean `--learning_rate`"),
                        (["--network_dim", "8", "oops"], "`--network_dim` takes one value, got '8' and then 'oops'"),
                        (["--text_encoder_lr", "5e-5", "1e-5"], "takes one value.*one text encoder: one rate"),
                        (["--shuffle_caption", "oops"], "unexpected argument 'oops'")]:
        with pytest.raises(ConfigError, match=words):
            parse_config(["train", *argv])
    with pytest.raises(ConfigError) as info:
        parse_config(["train", "--huggingface_token", "hf_secret_value"])
    assert "hf_secret_value" not in str(info.value) and "lorakit push" in str(info.value)
    # other jobs have no sd-scripts tables: the same flag is an unknown option there
    with pytest.raises(ConfigError, match="unknown option `--log_with` for `merge`"):
        parse_config(["merge", "--models", "a.safetensors", "--log_with", "x"])


def test_a_whole_pasted_command_with_its_launcher_and_gen_img_options(capsys):
    """The launcher and script before the flags are left out (with a note); another script is named; switches
    written with a value are read as switches; gen_img.py's option names are generate's."""
    cfg, _ = parse_config(["train", "accelerate", "launch", "--num_cpu_threads_per_process", "1", "train_network.py",
                           "--network_dim=8", "--shuffle_caption", "true", "--cache_latents", "false",
                           "--network_module", "networks.lora"])
    assert (cfg.network_dim, cfg.shuffle_caption, cfg.cache_latents) == (8, True, False)
    assert "reading the options of the pasted train_network.py command" in capsys.readouterr().err
    cfg, _ = parse_config(["train", "python", "sd-scripts/train_network.py", "--flip_aug", "yes"])
    assert cfg.flip_aug
    with pytest.raises(ConfigError, match="does not read sdxl_train_network.py's options .*lorakit is for SD 1.x/2.x"):
        parse_config(["train", "accelerate", "launch", "sdxl_train_network.py", "--network_dim", "8"])
    with pytest.raises(ConfigError, match=r"`lorakit generate` does not read train_network.py's options \(lorakit "
                                          r"train does\)"):
        parse_config(["generate", "train_network.py", "--prompt", "x"])
    cfg, _ = parse_config(["generate", "gen_img.py", "--ckpt", "lorakit-toy", "--steps", "12", "--scale", "5",
                           "--sampler", "k_euler_a", "--images_per_prompt", "2", "--outdir", "out", "--W", "64",
                           "--H", "32", "--network_module", "networks.lora", "--xformers", "--prompt", "a cat"])
    assert (cfg.pretrained_model_name_or_path, cfg.num_inference_steps, cfg.guidance_scale, cfg.scheduler,
            cfg.num_images, cfg.output_dir, cfg.width, cfg.height) == ("lorakit-toy", 12, 5.0, "euler_a", 2, "out",
                                                                      64, 32)
    assert "`network_module` (on the command line) is not used by lorakit" in capsys.readouterr().err


def test_a_config_brought_from_sd_scripts_is_told_which_of_lorakits_defaults_differ(tmp_path, capsys):
    """A pasted train_network.py command that sets only `--unet_lr` trains sd-scripts' text encoder at its default
    learning_rate (2e-6) and lorakit's at 1e-4; a LoCon without conv_alpha at 1/conv_dim vs 1. The run says so for
    every such option it leaves unset, and for none it sets (also in a config file or a dataset TOML)."""
    def note(argv):
        capsys.readouterr()
        parse_config(["train", *argv])
        lines = [x for x in capsys.readouterr().err.splitlines() if "differ from sd-scripts'" in x]
        return lines[0] if lines else ""

    pasted = ["accelerate", "launch", "train_network.py", "--unet_lr=1e-4", "--network_dim=32", "--network_args",
              "conv_dim=8"]
    text = note(pasted)
    for part in ["learning_rate = 0.0001 (sd-scripts: 2e-06", "network_alpha = 8 (sd-scripts: 1)",
                 'caption_extension = ".txt" (sd-scripts: ".caption")', "seed = 42", "cache_latents = true",
                 'save_precision = "fp16" (sd-scripts: fp32)', 'output_name = "lora" (sd-scripts: "last")',
                 "conv_alpha = 8, conv_dim's (sd-scripts: 1)"]:
        assert part in text, (part, text)
    assert "network_dim" not in text and "8 option(s)" in text
    # what the command sets is not listed; with both rates set, learning_rate is unused
    text = note([*pasted[:3], "--unet_lr=1e-4", "--text_encoder_lr=5e-5", "--network_alpha", "16", "--seed", "1",
                 "--network_args", "conv_dim=8", "conv_alpha=1"])
    assert text and not any(f"{k} =" in text for k in ("learning_rate", "network_alpha", "seed", "conv_alpha"))
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n"
                                      "caption_extension = '.caption'\n")
    (tmp_path / "t.toml").write_text(f"learning_rate = 1e-4\n[saving]\noutput_name = 'last'\nsave_precision = 'fp16'\n"
                                     f"dataset_config = '{tmp_path / 'ds.toml'}'\n")
    text = note(["--config_file", str(tmp_path / "t.toml")])  # sd-scripts' spelling of --config
    assert "network_alpha = 8" in text and not any(f"{k} =" in text for k in (
        "learning_rate", "output_name", "save_precision", "caption_extension"))
    assert note(["--unet_lr=1e-4"]) == "" and note(["--config", str(tmp_path / "t.toml")]) == ""  # lorakit's own


def test_the_sd_scripts_defaults_table_names_options_whose_defaults_differ():
    from lorakit.config.train import SD_SCRIPTS_DEFAULTS

    theirs = {"learning_rate": 2e-6, "network_dim": 4, "network_alpha": 1.0, "caption_extension": ".caption",
              "seed": None, "cache_latents": False, "save_precision": None, "output_name": "last"}
    assert set(SD_SCRIPTS_DEFAULTS) == set(theirs)
    defaults = TrainConfig()
    for name, value in theirs.items():
        assert getattr(defaults, name) != value, name


def test_command_line_sd_scripts_flags_and_a_config_file_together(tmp_path, capsys):
    (tmp_path / "t.toml").write_text("caption_extension = '.txt'\nnetwork_dim = 4\n")
    cfg, _ = parse_config(["train", "--config", str(tmp_path / "t.toml"), "--caption_extention", ".caption",
                           "--lowram"])
    assert (cfg.caption_extension, cfg.network_dim) == (".caption", 4)  # the command line wins, as for any flag
    assert "`lowram` (on the command line)" in capsys.readouterr().err
    cfg, _ = parse_config(["train", "--config_file", str(tmp_path / "t.toml")])  # sd-scripts' name of --config
    assert cfg.network_dim == 4


def test_lr_warmup_steps_is_a_count_or_a_fraction_of_the_training_steps(tmp_path):
    """sd-scripts reads `lr_warmup_steps = 0.05` as 5% of the steps; an integer is a number of steps and stays an
    integer through TOML, the command line and direct construction."""
    from lorakit.optim import make_scheduler, resolve_warmup_steps

    for value, expected in [(0, 0), (100, 100), (100.0, 100), ("20", 20), ("0.05", 0.05), (0.25, 0.25),
                            ("1e-1", 0.1), ("5%", 0.05), (" 10% ", 0.1)]:  # sd-scripts' percentages too
        got = TrainConfig.from_dict({"lr_warmup_steps": value}).lr_warmup_steps
        assert got == expected and type(got) is type(expected), (value, got)
    assert type(TrainConfig(lr_warmup_steps=100.0).lr_warmup_steps) is int
    for cfg in (TrainConfig(lr_warmup_steps=100), TrainConfig(lr_warmup_steps=0.05)):
        again = TrainConfig.from_toml(cfg.save_toml(tmp_path / "t.toml"))
        assert type(again.lr_warmup_steps) is type(cfg.lr_warmup_steps) and again.to_dict() == cfg.to_dict()
    assert "lr_warmup_steps = 100\n" in TrainConfig(lr_warmup_steps=100).to_toml()
    cfg, _ = parse_config(["train", "--lr_warmup_steps", "0.1"])
    assert cfg.lr_warmup_steps == 0.1
    for bad, words in [(1.5, "whole number of steps or a fraction < 1"), (-1, "≥ 0"), ("abc", "must be a number"),
                       (True, "must be a number"), ("x%", "must be a number"), ("150%", "a fraction < 1")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig.from_dict({"lr_warmup_steps": bad})
    assert [resolve_warmup_steps(v, 1600) for v in (0, 7, 0.05, 0.999)] == [0, 7, 80, 1598]
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler("constant", opt, warmup_steps=resolve_warmup_steps(0.25, 8), total_steps=8)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.5, 1.0, 1.0]  # a quarter of 8 steps: 2 steps of warm-up


def test_choice_aliases_apply_to_a_config_built_in_python():
    """`TrainConfig(sample_sampler="k_euler_a")` is what a TOML with the same line gives."""
    cfg = TrainConfig(sample_sampler="k_euler_a", optimizer_type="adamw8bit")
    assert (cfg.sample_sampler, cfg.optimizer_type) == ("euler_a", "AdamW8bit")
    assert cfg.replace(sample_sampler="K_LMS").sample_sampler == "lms"
    assert GenerateConfig(prompt="x", scheduler="k_dpm_2_a").scheduler == "dpm_2_a"
    with pytest.raises(ConfigError, match="`sample_sampler` must be one of"):
        TrainConfig(sample_sampler="k_nope")


def test_network_args_are_read_or_refused_by_name():
    """Every sd-scripts `network_args` key either does what it does there or is refused by name: none is dropped
    without a word (a per-block rank left out would train another network than the config says)."""
    from lorakit.config.train import parse_network_args

    assert parse_network_args(["conv_dim=8", "conv_alpha = 4", "loraplus_lr_ratio=16", "rank_dropout=0.1",
                               "module_dropout=0", "use_tucker=False", "block_dims=0"]) == {
        "conv_dim": 8, "conv_alpha": 4.0, "loraplus_lr_ratio": 16.0, "rank_dropout": 0.1, "module_dropout": 0.0}
    cfg = TrainConfig(network_args=["loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=8"])
    assert (cfg.loraplus_ratio("unet"), cfg.loraplus_ratio("text_encoder")) == (8.0, 16.0)
    assert TrainConfig().loraplus_ratio("unet") is None
    for arg, words in [("block_dims=2,4,4,4,8,8,8,8,12,12,12,12,16,16,16,16,12,12,12,12,8,8,8,8,4",
                        "block_dims=.*does not have per-block ranks"),
                       ("down_lr_weight=0.5", "per-block learning rates"),
                       ("rank_dropout=1", "rank_dropout='1': must be a number in \\[0, 1\\)"),
                       ("algo=loha", "LyCORIS"), ("conv_dims=4", "unknown key 'conv_dims'; did you mean 'conv_dim'"),
                       ("loraplus_lr_ratio=0", "must be a number > 0"), ("loraplus_lr_ratio=x", "> 0"),
                       ("conv_alpha=-1", "must be a number ≥ 0"), ("conv_dim", "must be key=value")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(network_args=[arg])


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


def test_cache_text_encoder_outputs_is_read_for_a_frozen_text_encoder():
    """sd-scripts' `cache_text_encoder_outputs` (what lorakit does whenever the text encoder is frozen) is accepted
    with `network_train_unet_only` and refused, saying why, for a text encoder that trains."""
    assert TrainConfig(train_data_dir="x", cache_text_encoder_outputs=True, network_train_unet_only=True)
    assert TrainConfig(train_data_dir="x", cache_text_encoder_outputs=True, text_encoder_lr=0)
    with pytest.raises(ConfigError, match="cannot cache a text encoder that trains"):
        TrainConfig(train_data_dir="x", cache_text_encoder_outputs=True)


def test_text_encoder_lr_reads_sd_scripts_list_of_one():
    """sd-scripts takes one text-encoder rate per text encoder (`--output_config` writes `[5e-05]`): a list of one
    is that rate, two (SDXL's) are refused."""
    assert TrainConfig.from_dict({"text_encoder_lr": [5e-5]}).text_encoder_lr == 5e-5
    assert TrainConfig.from_dict({"text_encoder_lr": []}).text_encoder_lr is None
    with pytest.raises(ConfigError, match="two are SDXL's"):
        TrainConfig.from_dict({"text_encoder_lr": [1e-5, 2e-5]})


def test_train_dry_run_checks_and_shows_the_datasets(tmp_path, capsys):
    """`--dry_run` reads a dataset TOML as the run would (a misspelt key is an error) and shows its values, which win
    over the train options (as in sd-scripts); a missing folder is named."""
    (tmp_path / "img").mkdir()
    (tmp_path / "ds.toml").write_text('[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 32\n'
                                      'batch_size = 2\n  [[datasets.subsets]]\n  image_dir = "img"\n'
                                      '  num_repeats = 3\n  class_tokens = "sks shape"\n')
    assert main(["train", "--dataset_config", str(tmp_path / "ds.toml"), "--train_batch_size", "4", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "train_batch_size = 4" in out and "as this run reads it (its values win over the options above)" in out
    assert "# [[datasets]] 1: resolution 32x32, batch_size 2, enable_bucket false" in out
    assert f"#   {tmp_path / 'img'}: num_repeats 3, is_reg false, class_tokens 'sks shape'" in out
    assert "shuffle_caption true" in out
    (tmp_path / "ds.toml").write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "img"\n  num_repeat = 3\n')
    assert main(["train", "--dataset_config", str(tmp_path / "ds.toml"), "--dry_run"]) == 2
    assert "unknown or unsupported key `num_repeat`" in capsys.readouterr().err
    assert main(["train", "--train_data_dir", str(tmp_path / "nope"), "--dry_run"]) == 2
    assert "`train_data_dir` does not exist" in capsys.readouterr().err
