"""Every notebook, executed headless (nbclient) on the toy model through its parameters cell, in reading order in one
working folder (as a user would run them); then what each one wrote is checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
QUICK = {"max_train_steps": 3, "train_batch_size": 2, "sample_every_n_steps": 2}


def inject(nb, values: dict) -> None:
    """Like papermill: a cell after the `parameters` cell that overrides some of its values."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def execute(name: str, workdir: Path, values: dict, allow_errors: bool = False):
    """Run a notebook with nbclient in `workdir`; the kernel imports this checkout of lorakit."""
    if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    inject(nb, values)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, workdir / f"{name}.executed.ipynb")
    return nb


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    """Run the six notebooks in order; a failure is recorded and reported by that notebook's test."""
    work = tmp_path_factory.mktemp("notebooks")
    prompts = work / "prompts.txt"
    prompts.write_text("a sks shape --s 2 --d 1\n")
    params = {
        "01_prepare_data": dict(NUM_REG_IMAGES=2, REG_STEPS=2),
        "02_train_dreambooth_lora": dict(OVERRIDES=QUICK, SAMPLE_PROMPTS=str(prompts)),
        "03_train_caption_lora": dict(OVERRIDES=QUICK, SAMPLE_PROMPTS=str(prompts)),
        "04_merge": dict(QUICK=QUICK, GEN_STEPS=2),
        "05_extract": dict(QUICK=QUICK, GEN_STEPS=2, DIM=8),
        "06_generate": dict(QUICK=QUICK, OVERRIDES={"num_inference_steps": 2}, MULTIPLIERS=[0.0, 1.0], SEEDS=[1, 2]),
    }
    results = {}
    # 01 twice: a notebook run again (Colab with Drive, a workshop) replaces what its first run wrote
    for key, (name, values) in [*((n, (n, v)) for n, v in params.items()),
                                ("01 again", ("01_prepare_data", params["01_prepare_data"]))]:
        try:
            results[key] = execute(name, work, values)
        except CellExecutionError as e:
            results[key] = e
    return work, results


def ran(run_all, name):
    work, results = run_all
    if isinstance(results[name], Exception):
        pytest.fail(f"{name} failed:\n{str(results[name])[-3000:]}")
    return work, results[name]


def toy_size() -> int:
    from lorakit.toy.world import SIZE

    return SIZE


def lora_keys(path: Path) -> tuple[list[str], dict]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_01_prepare_data(run_all):
    ran(run_all, "01_prepare_data")
    work, _ = ran(run_all, "01 again")  # then run again over its own outputs
    report = json.loads((work / "data" / "check_report.json").read_text())
    assert report and isinstance(report, dict)
    repaired = sorted((work / "data" / "repaired").glob("*.png"))
    n_images = len(list((work / "data_examples" / "captions").glob("*.png")))  # the example it prepares
    assert n_images and len(repaired) == n_images
    captioned = sorted((work / "data" / "captioned").glob("*.png"))
    assert [p.name for p in captioned] == [p.name for p in repaired]
    captions = [p.with_suffix(".txt").read_text() for p in captioned]
    assert all(c.startswith("sks") and not c.startswith("sks, sks") for c in captions)
    db = [p for p in (work / "data" / "dreambooth").iterdir() if p.is_dir()]
    assert len(db) == 1 and db[0].name.endswith("_sks shape") and len(list(db[0].glob("*.png"))) == n_images
    reg = list((work / "data" / "reg").rglob("*.png"))
    assert len(reg) == 2 and {png_size(p) for p in reg} == {(toy_size(), toy_size())}


@pytest.mark.parametrize("name,folder,stem", [("02_train_dreambooth_lora", "dreambooth", "sks_shape"),
                                              ("03_train_caption_lora", "captions", "striped")])
def test_training_notebooks(run_all, name, folder, stem):
    from huggingface_hub import ModelCard

    work, nb = ran(run_all, name)
    out = work / "output" / folder
    keys, meta = lora_keys(out / f"{stem}.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in keys)
    assert json.loads(meta["lorakit.training_config"])["max_train_steps"] == QUICK["max_train_steps"]
    assert png_size(out / f"{stem}_loss.png") == (600, 320)  # the live view's loss plot, saved next to the LoRA
    assert png_size(out / "samples_grid.png")[0] > toy_size()
    card = ModelCard((out / "README.md").read_text())
    assert card.data.to_dict()["tags"] == ["lora", "text-to-image", "stable-diffusion", "lorakit"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)  # form + live view


def test_04_merge(run_all):
    work, _ = ran(run_all, "04_merge")
    out = work / "output" / "merge"
    keys, _ = lora_keys(out / "sks_striped.safetensors")
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    keys4, _ = lora_keys(out / "sks_striped_rank4.safetensors")
    with safe_open(str(out / "sks_striped_rank4.safetensors"), framework="pt") as f:
        down = next(k for k in keys4 if k.endswith("lora_down.weight"))
        assert f.get_tensor(down).shape[0] <= 4
    model_keys, _ = lora_keys(out / "toy_sks.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in model_keys)
    images = sorted((out / "images").glob("0*.png"))
    assert len(images) == 4 and {png_size(p) for p in images} == {(toy_size(), toy_size())}


def test_05_extract(run_all):
    work, _ = ran(run_all, "05_extract")
    out = work / "output" / "extract"
    keys, _ = lora_keys(out / "extracted.safetensors")
    assert any(k.startswith("lora_unet_") for k in keys)
    w, h = png_size(out / "comparison.png")
    assert w >= 2 * toy_size() and h >= 2 * toy_size()


def test_06_generate(run_all):
    work, _ = ran(run_all, "06_generate")
    out = work / "output" / "generate"
    images = sorted(out.glob("0*.png"))
    assert len(images) == 4 and {png_size(p) for p in images} == {(toy_size(), toy_size())}
    with Image.open(images[0]) as im:
        assert "sks" in im.info["parameters"]
    w, h = png_size(out / "xy_grid.png")
    assert w > 2 * 128 and h > 2 * 128  # 2 × 2 cells of at least 128 px plus labels


def test_bad_dataset_path_is_one_clear_line(tmp_path):
    nb = execute("02_train_dreambooth_lora", tmp_path, dict(TRAIN_DATA_DIR="no/such/folder", REG_DATA_DIR=None,
                                                             OVERRIDES=QUICK), allow_errors=True)
    train_cell = next(c for c in nb.cells if c.cell_type == "code" and c.source == "result = form.submit()")
    errors = [o for o in train_cell.outputs if o.output_type == "error"]
    assert len(errors) == 1 and "no/such/folder" in errors[0].evalue
    assert len(errors[0].traceback) == 1  # one line, no traceback wall
