"""Push to the Hub, offline: the upload is intercepted at the `HfApi` boundary; the card is parsed by the Hub's own
`ModelCard`; a token handed to lorakit must end up in no file and no output."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, ModelCard
from PIL import Image, PngImagePlugin

from lorakit import hub
from lorakit.config import PushConfig
from lorakit.errors import ConfigError
from lorakit.fileio import save_safetensors

TOKEN = "hf_lorakitTestToken0123456789abcdefXYZ"


class FakeApi:
    """Records what would be sent to the Hub."""

    instances: list[FakeApi] = []

    def __init__(self, endpoint=None, token=None):
        self.endpoint, self.token, self.calls = endpoint, token, []
        FakeApi.instances.append(self)

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://hub.example/{kw['repo_id']}"

    def create_commit(self, **kw):
        self.calls.append(("create_commit", kw))
        return "commit"

    remote_readme: Path | None = None  # the repo's README.md on the Hub (None: the repo has none)

    def hf_hub_download(self, **kw):
        from huggingface_hub.errors import EntryNotFoundError

        if self.remote_readme is None:
            raise EntryNotFoundError("no README.md")
        return str(self.remote_readme)


def make_output(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
         "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4),
         "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    train_cfg = {"pretrained_model_name_or_path": "lorakit-toy", "network_dim": 4, "network_alpha": 2.0,
                 "learning_rate": 0.001, "max_train_steps": 300, "seed": 42, "optimizer_type": "AdamW"}
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_output_name": "toy_lora",
            "ss_dataset_dirs": json.dumps({"20_sks shape": {"n_repeats": 20, "img_count": 4}}),
            "ss_sd_model_name": "lorakit-toy", "lorakit.training_config": json.dumps(train_cfg)}
    save_safetensors(t, folder / "toy_lora-000100.safetensors", meta)
    save_safetensors(t, folder / "toy_lora.safetensors", meta)
    (folder / "samples").mkdir(exist_ok=True)
    for i, prompt in enumerate(["a sks shape", "a red sks shape on a white background"]):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"{prompt}\nSteps: 20, Seed: {i}")
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(folder / "samples" / f"step100_{i}.png", pnginfo=info)
    Image.new("RGB", (600, 320), "white").save(folder / "toy_lora_loss.png")
    (folder / "train_config.toml").write_text("network_dim = 4\n")
    return folder


def test_card_parses_with_the_hubs_model_card_and_has_the_fields(tmp_path):
    out = make_output(tmp_path / "output")
    plan = hub.plan_upload(repo_id="me/toy-lora", output_dir=str(out))
    card = ModelCard(plan.card)
    data = card.data.to_dict()
    assert "base_model" not in data  # the Hub validates it as a model id: lorakit-toy is lorakit's own
    assert "pipe.load_lora_weights('me/toy-lora', weight_name='toy_lora.safetensors')" in card.text
    snippet = card.text.split("```python\n")[1].split("```")[0]
    ast.parse(snippet)  # runs as pasted: on a GPU, in half precision
    assert "torch_dtype=torch.float16).to('cuda')" in snippet and "import torch" in snippet
    assert data["tags"] == ["lora", "text-to-image", "stable-diffusion", "lorakit"]
    assert data["instance_prompt"] == "sks shape"  # from the DreamBooth folder name
    assert data["license"] == "creativeml-openrail-m"
    prompts = {w["text"] for w in data["widget"]}
    assert prompts == {"a sks shape", "a red sks shape on a white background"}
    assert all(w["output"]["url"] in plan.paths_in_repo for w in data["widget"])
    assert "| rank (network_dim) | `4` |" in card.text and "| steps | `300` |" in card.text
    assert "weight_name='toy_lora.safetensors'" in card.text
    assert (out / "README.md").read_text() == plan.card


def test_upload_plan_is_one_commit_with_loras_samples_and_card(tmp_path):
    out = make_output(tmp_path / "output")
    api = FakeApi()
    url = hub.push_to_hub(PushConfig(repo_id="me/toy-lora", output_dir=str(out), private=False), api=api)
    assert url == "https://hub.example/me/toy-lora"
    (name1, repo), (name2, commit) = api.calls
    assert name1 == "create_repo" and repo == dict(repo_id="me/toy-lora", repo_type="model", private=False,
                                                     exist_ok=True)
    assert name2 == "create_commit" and commit["repo_id"] == "me/toy-lora"
    ops = commit["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted([
        "toy_lora.safetensors", "toy_lora-000100.safetensors", "images/samples/step100_0.png",
        "images/samples/step100_1.png", "images/toy_lora_loss.png", "train_config.toml", "README.md"])
    for op in ops:
        assert Path(op.path_or_fileobj).is_file()


def test_a_dataset_kept_in_the_output_folder_is_not_published(tmp_path, capsys):
    """Only the images training writes are uploaded: photos in `output_dir` (a Drive project folder holding its
    `10_sks person/` dataset beside the outputs) are withheld, and the push says so."""
    out = make_output(tmp_path / "output")
    (out / "10_sks person").mkdir()
    for name in ("IMG_0001.jpg", "IMG_0002.png"):
        Image.new("RGB", (64, 64), "blue").save(out / "10_sks person" / name)
    Image.new("RGB", (64, 64), "blue").save(out / "portrait.png")
    plan = hub.plan_upload(repo_id="me/toy-lora", output_dir=str(out))
    assert sorted(p for p in plan.paths_in_repo if p.startswith("images/")) == [
        "images/samples/step100_0.png", "images/samples/step100_1.png", "images/toy_lora_loss.png"]
    assert "IMG_" not in plan.card and "portrait" not in plan.card
    (what, why), = [w for w in plan.withheld if "other image" in w[0]]
    assert what.startswith("3 other image(s)") and "not written by training" in why


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_token_appears_in_no_file_and_no_output(tmp_path, monkeypatch, capsys, via):
    import huggingface_hub

    out = make_output(tmp_path / "output")
    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    kwargs = dict(repo_id="me/toy-lora", output_dir=str(out))
    if via == "argument":
        kwargs["token"] = TOKEN
    else:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = PushConfig(**kwargs)
    hub.push_to_hub(cfg)
    assert FakeApi.instances[-1].token == TOKEN  # handed to the Hub client, and to nothing else
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert TOKEN not in repr(cfg) and TOKEN not in cfg.to_toml() and TOKEN not in json.dumps(cfg.to_dict())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    commit = dict(FakeApi.instances[-1].calls)["create_commit"]
    assert TOKEN not in commit["commit_message"]


def test_missing_token_is_a_clear_message(tmp_path, monkeypatch):
    out = make_output(tmp_path / "output")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "resolve_token", lambda explicit=None: explicit)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        hub.push_to_hub(repo_id="me/toy-lora", output_dir=str(out))


@pytest.mark.parametrize("kwargs,words", [
    (dict(repo_id=""), ["repo_id", "your-name/my-lora"]),
    (dict(repo_id="a/b/c"), ["repo_id"]),
    (dict(repo_id="me/x", output_dir="does/not/exist"), ["output_dir", "does/not/exist", "train first"]),
])
def test_bad_input_is_named(tmp_path, kwargs, words):
    with pytest.raises(ConfigError) as e:
        hub.push_to_hub(api=FakeApi(), **kwargs)
    for word in words:
        assert word in str(e.value)


def test_empty_output_folder_says_train_first(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA file"):
        hub.plan_upload(repo_id="me/x", output_dir=str(tmp_path))


def test_local_base_model_path_is_not_put_in_the_metadata(tmp_path):
    out = make_output(tmp_path / "output")
    plan = hub.plan_upload(repo_id="me/x", output_dir=str(out), base_model="/models/my-model.safetensors")
    assert "base_model" not in ModelCard(plan.card).data.to_dict()
    hub_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a Hub model id is
    plan = hub.plan_upload(repo_id="me/x", output_dir=str(out), base_model=hub_model)
    assert ModelCard(plan.card).data.to_dict()["base_model"] == hub_model


def test_a_toml_holding_a_token_is_never_uploaded(tmp_path, capsys):
    """A push config kept beside the LoRA may set `token`: it stays on the machine; the training config goes up."""
    out = make_output(tmp_path / "output")
    (out / "push.toml").write_text(f'repo_id = "me/toy-lora"\ntoken = "{TOKEN}"\n')
    (out / "notes.toml").write_text(f'[hub]\ncomment = "uses {TOKEN}"\n')
    (out / "broken.toml").write_text("this is = = not toml\n")
    api = FakeApi()
    hub.push_to_hub(PushConfig(repo_id="me/toy-lora", output_dir=str(out)), api=api)
    commit = dict(api.calls)["create_commit"]
    sent = [Path(op.path_or_fileobj) for op in commit["operations"]]
    assert "train_config.toml" in [p.name for p in sent]
    assert not {"push.toml", "notes.toml", "broken.toml"} & {p.name for p in sent}
    assert all(TOKEN.encode() not in p.read_bytes() for p in sent)
    printed = capsys.readouterr().out
    assert "not uploading push.toml: it sets `token`" in printed
    assert "not uploading notes.toml: it holds text like a Hub token" in printed and TOKEN not in printed


def test_upper_case_extension_and_damaged_lora_header(tmp_path):
    out = make_output(tmp_path / "output")
    for p in out.glob("*.safetensors"):
        p.rename(p.with_suffix(".SAFETENSORS"))
    plan = hub.plan_upload(PushConfig(repo_id="me/toy-lora", output_dir=str(out)))
    assert plan.metadata["lora"] == "toy_lora.SAFETENSORS" and "lorakit-toy" in plan.card  # its metadata was read
    assert "toy_lora.SAFETENSORS" in plan.paths_in_repo and "toy_lora-000100.SAFETENSORS" in plan.paths_in_repo
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from lorakit.errors import LoraFormatError

    with pytest.raises(LoraFormatError, match="lora.safetensors: not a readable .safetensors file"):
        hub.plan_upload(PushConfig(repo_id="me/toy-lora", output_dir=str(bad)))


def test_a_readme_of_the_users_is_kept_and_lorakits_card_is_rewritten(tmp_path, capsys):
    out = make_output(tmp_path / "output")
    plan = hub.plan_upload(PushConfig(repo_id="me/toy-lora", output_dir=str(out)))
    card = (out / "README.md").read_text()
    assert hub.CARD_MARKER in card and card == plan.card  # lorakit's card: rewritten on the next push
    hub.plan_upload(PushConfig(repo_id="me/other-name", output_dir=str(out)))
    assert "# other-name" in (out / "README.md").read_text()
    (out / "README.md").write_text("# My own notes\n")  # the user's card (marker line deleted)
    hub.plan_upload(PushConfig(repo_id="me/toy-lora", output_dir=str(out)))
    assert (out / "README.md").read_text() == "# My own notes\n"
    assert "README.md is yours" in capsys.readouterr().out


def test_a_card_edited_on_the_hub_is_kept(tmp_path, capsys):
    """A README.md rewritten on the Hub (lorakit's marker gone) is not overwritten by the next push; one still
    holding the marker is lorakit's and is updated."""
    out = make_output(tmp_path / "output")
    api = FakeApi()
    api.remote_readme = tmp_path / "remote.md"
    api.remote_readme.write_text("# My LoRA\n\nHand-written description.\n")
    hub.push_to_hub(PushConfig(repo_id="me/toy-lora", output_dir=str(out)), api=api)
    sent = [op.path_in_repo for op in api.calls[-1][1]["operations"]]
    assert "README.md" not in sent and "toy_lora.safetensors" in sent
    assert "README.md on the Hub has no lorakit marker" in capsys.readouterr().out
    api.remote_readme.write_text(hub.CARD_MARKER + "\n# old card\n")
    hub.push_to_hub(PushConfig(repo_id="me/toy-lora", output_dir=str(out)), api=api)
    assert "README.md" in [op.path_in_repo for op in api.calls[-1][1]["operations"]]


def test_an_earlier_runs_saves_and_samples_in_the_folder_are_not_uploaded(tmp_path, tiny_sd1_dir):
    """sd-scripts' ss_session_id marks every save (and lorakit's samples) of one run, kept on resume: a run that
    replaced an earlier one (`overwrite`) uploads its own files only, the earlier ones are listed as withheld."""
    import shutil

    import lorakit

    data, old = tmp_path / "data" / "1_x", tmp_path / "old"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    (tmp_path / "p.txt").write_text("a red x --s 1 --w 32 --h 32\n")
    kw = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
              output_dir=str(tmp_path / "out"), sample_prompts=str(tmp_path / "p.txt"), sample_at_end=False,
              save_state=True, overwrite=True)
    # files of an earlier run that the `overwrite` run did not know of (copied in from another folder) stay
    lorakit.train(max_train_steps=3, save_every_n_steps=1, sample_every_n_steps=1, **{**kw, "output_dir": str(old)})
    lorakit.train(max_train_steps=4, save_every_n_steps=3, sample_every_n_steps=3, **kw)  # replaced by this one
    shutil.copy(old / "lora-step00000001.safetensors", tmp_path / "out")
    for sample in (old / "samples").glob("000001_*.png"):
        shutil.copy(sample, tmp_path / "out" / "samples")
    # killed and resumed, a run keeps its session: its saves before and after the resume all go up
    lorakit.train(max_train_steps=5, resume="latest", **{**kw, "overwrite": False})
    plan = hub.plan_upload(repo_id="me/x", output_dir=str(tmp_path / "out"))
    loras = sorted(dest for _, dest in plan.files if dest.endswith(".safetensors"))
    assert loras == ["lora-step00000003.safetensors", "lora.safetensors"]
    samples = sorted(dest for _, dest in plan.files if dest.startswith("images/samples/"))
    assert samples and all(name.startswith("images/samples/000003") for name in samples)
    withheld = dict(plan.withheld)
    assert withheld["lora-step00000001.safetensors"] == "from an earlier training run in this folder"
    assert any(name.startswith("samples/000001") for name in withheld)


def test_a_pasted_token_with_a_newline_is_sent_without_it(tmp_path, monkeypatch):
    """Sent with a newline or spaces, a token would be an invalid HTTP header, whose error quotes the token."""
    import huggingface_hub

    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for token, env in [(f" {TOKEN}\n", None), (None, f"{TOKEN}\n")]:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        if env is not None:
            monkeypatch.setenv("HF_TOKEN", env)
        hub.push_to_hub(repo_id="me/toy-lora", output_dir=str(make_output(tmp_path / "output")), token=token)
        assert FakeApi.instances[-1].token == TOKEN


def test_a_failed_push_is_one_line_without_the_token(tmp_path, monkeypatch, capsys):
    from lorakit.errors import HubError

    class FailingApi(FakeApi):
        def create_commit(self, **kw):
            raise ValueError(f"Illegal header value b'Bearer {self.token}' (also seen: hf_{'x' * 30})")

    out = make_output(tmp_path / "output")
    with pytest.raises(HubError, match=r"push to me/toy-lora failed: ValueError: Illegal header value") as err:
        hub.push_to_hub(repo_id="me/toy-lora", output_dir=str(out), api=FailingApi(token=TOKEN))
    assert TOKEN not in str(err.value) and "hf_xxx" not in str(err.value) and "hf_***" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback quoting it
    assert TOKEN not in "".join(capsys.readouterr())


def test_a_token_of_the_wrong_type_is_not_echoed():
    with pytest.raises(ConfigError, match="`token` must be") as err:
        PushConfig(repo_id="me/toy-lora", token=[TOKEN])
    assert TOKEN not in str(err.value)
