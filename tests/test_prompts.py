"""Kohya prompt lines and prompt files."""

from __future__ import annotations

import importlib.util

import pytest

from lorakit.errors import ConfigError
from lorakit.prompts import PromptSpec, parse_prompt_line, parse_prompt_text, read_prompt_file


def test_full_line():
    spec = parse_prompt_line("a photo of sks dog --n lowres, blurry --w 512 --h 768 --s 28 --l 7.5 --d 42")
    assert spec == PromptSpec("a photo of sks dog", "lowres, blurry", 512, 768, 28, 7.5, 42)


def test_plain_prompt_and_any_order():
    assert parse_prompt_line("  a cat, sitting  ") == PromptSpec("a cat, sitting")
    spec = parse_prompt_line("a cat --d 3 --n dog --l 4")
    assert (spec.seed, spec.negative_prompt, spec.guidance_scale, spec.width) == (3, "dog", 4.0, None)


def test_dashes_inside_words_are_prompt_text():
    spec = parse_prompt_line("a well-lit half--timbered house --s 5")
    assert spec.prompt == "a well-lit half--timbered house" and spec.num_inference_steps == 5


def test_sampler_per_prompt_with_sd_scripts_names():
    assert parse_prompt_line("a cat --ss euler_a --s 4").sampler == "euler_a"
    assert parse_prompt_line("a cat --ss K_EULER_A").sampler == "euler_a"  # sd-scripts' k_ names are aliases
    assert parse_prompt_line("a cat --ss dpm_2_a").sampler == "dpm_2_a"
    with pytest.raises(ConfigError, match="`--ss` .*one of ddim"):
        parse_prompt_line("a cat --ss euler_b")


def test_every_sampler_name_builds_its_diffusers_scheduler():
    from diffusers import DDPMScheduler

    from lorakit.config.train import SAMPLER_ALIASES, SAMPLERS
    from lorakit.sampling import SAMPLER_LABELS, make_sampler
    from lorakit.sampling import SAMPLERS as BUILDERS

    assert tuple(BUILDERS) == SAMPLERS and set(SAMPLER_LABELS) == set(SAMPLERS)
    assert set(SAMPLER_ALIASES.values()) <= set(SAMPLERS)
    train = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    needs_scipy = {"lms"}  # diffusers' LMS scheduler imports scipy, which lorakit does not install
    built = {name: make_sampler(name, train) for name in SAMPLERS
             if name not in needs_scipy or importlib.util.find_spec("scipy")}
    if not importlib.util.find_spec("scipy"):
        with pytest.raises(ConfigError, match="sampler `lms`: .*pip install scipy"):
            make_sampler("lms", train)
    assert type(built["dpm_2_a"]).__name__ == "KDPM2AncestralDiscreteScheduler"
    assert built["dpmsolver"].config.algorithm_type == "dpmsolver"
    karras, plain = built["dpmsolver++_karras"], built["dpmsolver++"]  # A1111's "DPM++ 2M Karras"
    karras.set_timesteps(20)
    plain.set_timesteps(20)
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    assert karras.sigmas[-2] < plain.sigmas[-2]  # Karras spends more of the steps at low noise
    assert all(s.config.num_train_timesteps == 1000 and s.config.beta_end == 0.012 for s in built.values())


def test_noise_level_samplers_start_at_the_largest_noise_as_a1111():
    """k-diffusion's samplers in A1111 and ComfyUI start at t = 999 (σ ≈ 14.6 for SD); SD's scheduler config
    ("leading", steps_offset 1) would start them at t = 951 at 20 steps. DDIM keeps the model's spacing; a
    zero-terminal-SNR schedule starts at its last step."""
    from diffusers import DDPMScheduler

    from lorakit.sampling import make_sampler

    sd = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              steps_offset=1, timestep_spacing="leading")
    train = DDPMScheduler(**sd)
    for name in ("euler_a", "euler", "dpmsolver++", "heun"):
        sampler = make_sampler(name, train)
        sampler.set_timesteps(20)
        assert sampler.timesteps[0] == 999, name
    euler = make_sampler("euler_a", train)
    euler.set_timesteps(20)
    assert float(euler.sigmas[0]) == pytest.approx(14.61, abs=0.01)
    ddim = make_sampler("ddim", train)
    ddim.set_timesteps(20)
    assert ddim.timesteps[0] == 951
    zero = make_sampler("euler", DDPMScheduler(**sd, rescale_betas_zero_snr=True))
    assert zero.config.timestep_spacing == "trailing"


def test_round_trip_through_to_line():
    spec = PromptSpec("x y", "bad", 64, 64, 3, 2.5, 7, "euler")
    assert parse_prompt_line(spec.to_line()) == spec


def test_defaults_fill_only_unset_fields():
    spec = parse_prompt_line("a cat --s 5").with_defaults(num_inference_steps=30, guidance_scale=7.5)
    assert (spec.num_inference_steps, spec.guidance_scale) == (5, 7.5)


@pytest.mark.parametrize("line, match", [
    ("a cat --w 500", "multiple of 8"),
    ("a cat --s x", "must be int"),
    ("a cat --q 3", "unknown prompt option `--q`"),
    ("--n bad", "empty prompt"),
    ("a cat --s", "needs a value"),
    ("a cat --s 1001", "must be 1 to 1000, got 1001"),  # more steps than the schedule has: refused up front
    # A1111's LoRA tags would be read as words: refused, with what to do instead
    ("a cat <lora:sks_dog:0.8> --d 3", "`<lora:sks_dog:0.8>` .*`--network_weights sks_dog.safetensors` and "
                                       "`--network_mul 0.8`"),
    ("a cat --n <LyCO:blur>", "`<LyCO:blur>` in the prompt"),
    # A1111's prompt editing and alternation change the text while sampling: not done, refused
    ("a [cat:dog:0.5] on grass", "`\\[cat:dog:0.5\\]` in the prompt is A1111's prompt editing or alternation"),
    ("a [red|blue] ball --d 2", "`\\[red\\|blue\\]` in the prompt is A1111's prompt editing"),
    ("a photo --n [blurry::10]", "`\\[blurry::10\\]`"),
    ("a cat --l nan", "must be ≥ 1 .*got nan"),
    ("a cat --l inf", "must be ≥ 1 .*got inf"),
    ("a cat --d 99999999999999999999999", "must be 0 to 4294967295"),
    ("a cat --w 1000000", "multiple of 8 up to 4096"),
])
def test_bad_lines_are_clear_errors(line, match):
    with pytest.raises(ConfigError, match=match):
        parse_prompt_line(line)


def test_file_skips_comments_and_names_the_bad_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# samples\n\na cat --s 4\n  a dog --d 1\n")
    specs = read_prompt_file(f)
    assert [s.prompt for s in specs] == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match="line 2 of p.txt"):
        parse_prompt_text("ok\nbad --w 7", source="p.txt")
    with pytest.raises(ConfigError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeff# a comment, first line\na cat\n".encode())  # as Notepad saves it
    assert [s.prompt for s in read_prompt_file(tmp_path / "bom.txt")] == ["a cat"]
    (tmp_path / "latin.txt").write_bytes(b"a cat\n\xff\xfe bad\n")
    with pytest.raises(ConfigError, match=r"prompt file latin.txt is not UTF-8 text \(byte 0xff on line 2\)"):
        read_prompt_file(tmp_path / "latin.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


def test_de_emphasis_and_escaped_brackets_are_not_prompt_editing():
    for line in ("a [cat] photo", "a [[cat]], [b, c]", "a \\[cat:0.5\\] sign", "a (cat:1.2) photo"):
        assert parse_prompt_line(line).prompt == line


def test_option_letters_are_case_insensitive_like_sd_scripts():
    assert parse_prompt_line("a cat --W 64 --H 48 --D 3") == PromptSpec("a cat", width=64, height=48, seed=3)


def test_sd_scripts_toml_prompt_file(tmp_path):
    """sd-scripts' .toml layout: `[prompt]` defaults, one `[[prompt.subset]]` per prompt overriding them."""
    path = tmp_path / "prompts.toml"
    path.write_text('[prompt]\nnegative_prompt = "lowres"\nwidth = 512\nheight = 512\nscale = 7\nsample_steps = 28\n'
                    '\n[[prompt.subset]]\nprompt = "a photo of sks dog"\n\n[[prompt.subset]]\n'
                    'prompt = "sks dog on a beach"\nwidth = 768\nseed = 3\nsample_sampler = "k_euler_a"\n')
    assert read_prompt_file(path) == [
        PromptSpec("a photo of sks dog", negative_prompt="lowres", width=512, height=512, num_inference_steps=28,
                   guidance_scale=7.0),
        PromptSpec("sks dog on a beach", negative_prompt="lowres", width=768, height=512, num_inference_steps=28,
                   guidance_scale=7.0, seed=3, sampler="euler_a")]


def test_sd_scripts_json_prompt_file(tmp_path):
    """sd-scripts' .json: a list of prompt lines (kohya syntax) or of tables with its keys."""
    path = tmp_path / "prompts.json"
    path.write_text('["a red circle --w 64 --d 1", {"prompt": "a blue square", "guidance_scale": 5.5, "seed": 2, '
                    '"enum": 1}]')
    assert read_prompt_file(path) == [PromptSpec("a red circle", width=64, seed=1),
                                      PromptSpec("a blue square", guidance_scale=5.5, seed=2)]
    # beside sd-scripts' `scale` (the CFG scale), `guidance_scale` is its FLUX guidance, not read for SD
    path.write_text('[{"prompt": "a dog", "scale": 7.0, "guidance_scale": 3.5}]')
    assert read_prompt_file(path) == [PromptSpec("a dog", guidance_scale=7.0)]


@pytest.mark.parametrize("name,text,match", [
    ("p.toml", '[prompt]\nwidth = 500\n[[prompt.subset]]\nprompt = "x"\n', "`width` must be a multiple of 8.*prompt 1"),
    ("p.toml", '[[prompts.subset]]\nprompt = "x"\n', "has no \\[prompt\\] table"),
    ("p.toml", '[prompt]\nwidth = 512\n', "prompt 1 of p.toml\\) has no `prompt` text"),
    ("p.toml", 'prompt = [1\n', "invalid TOML"),
    ("p.json", '[{"prompt": "x", "controlnet_image": "c.png"}]', "unknown prompt key `controlnet_image`"),
    ("p.json", '[{"prompt": "x", "seed": "one"}]', "`seed` must be int, got 'one'"),
    ("p.json", '[{"prompt": "x", "sample_sampler": "nope"}]', "must be one of"),
    ("p.json", '{"prompt": "x"}', "must hold a list"),
    ("p.json", '[3]', "prompt 1 of p.json must be a prompt line or a table"),
    ("p.json", '[]', "has no prompts"),
    ("p.json", '[{"prompt": "a <lora:x:1> dog"}]', "`<lora:x:1>` in the prompt .prompt 1 of p.json"),
    ("p.json", '[{"prompt": "x", "seed": 1e30}]', "must be 0 to 4294967295"),
    ("p.toml", '[prompt]\nwidth = 64\nsubset = 3\n', "`subset` must be a list of tables"),
    ("p.toml", '[prompt]\nwidth = 64\nsubset = ["a cat"]\n', "`subset` must be a list of tables"),
    ("p.toml", '[prompt]\nscale = nan\n[[prompt.subset]]\nprompt = "x"\n', "must be ≥ 1 .*got nan"),
])
def test_bad_toml_and_json_prompt_files_name_the_problem(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_prompt_file(tmp_path / name)
