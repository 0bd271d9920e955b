"""The notebooks are teaching material and thin faces of the package: checked cell by cell."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_prepare_data", "02_train_dreambooth_lora", "03_train_caption_lora", "04_merge", "05_extract",
         "06_generate"]


def load(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def test_exactly_the_six_notebooks():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    nb = load(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert nb.cells[0].cell_type == "markdown" and len(nb.cells[0].source) > 600  # explains what and why
    assert len(markdown) >= 5
    assert [tags(c) for c in code].count({"parameters"}) == 1
    assert [tags(c) for c in code].count({"setup"}) == 1
    assert any("lorakit.widgets.form(" in c.source for c in code), "every notebook has a form"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "outputs must not be committed"
        lines = cell.source.splitlines()
        assert 1 <= len(lines) <= 5, f"{len(lines)} lines:\n{cell.source}"
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Global,
                                         ast.For, ast.While, ast.AsyncFor, ast.Lambda)), cell.source
        if not tags(cell) & {"parameters", "setup"}:
            # `form.submit()` runs the lorakit job behind the form (the same as its button)
            assert "lorakit." in cell.source or "form.submit()" in cell.source, f"no lorakit call:\n{cell.source}"
        if "parameters" in tags(cell):
            assert "import" not in cell.source  # plain values only, so papermill/tests can inject others


@pytest.mark.parametrize("name", NAMES)
def test_setup_stops_with_a_sentence_while_lorakit_source_names_no_owner(name, monkeypatch):
    """On Colab (lorakit not installed), a LORAKIT_SOURCE still holding `<OWNER>` stops the set-up cell with what to
    do, instead of a pip error about a repository that does not exist."""
    import importlib.util
    import subprocess

    setup = next(c for c in load(name).cells if c.cell_type == "code" and "setup" in tags(c))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lorakit" else real(n, *a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(SystemExit, match="Replace <OWNER> in LORAKIT_SOURCE"):
        exec(setup.source, {"LORAKIT_SOURCE": "git+https://github.com/<OWNER>/lorakit", "USE_DRIVE": False})


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_comes_before_setup_and_names_colab_options(name):
    code = [c for c in load(name).cells if c.cell_type == "code"]
    assert "parameters" in tags(code[0]) and "setup" in tags(code[1])
    assert "USE_DRIVE" in code[0].source and "LORAKIT_SOURCE" in code[0].source
    assert "lorakit.colab.setup(use_drive=USE_DRIVE)" in code[1].source


@pytest.mark.parametrize("name,words", [
    ("02_train_dreambooth_lora", ["rank", "alpha", "repeats", "regularisation", "prior_loss_weight"]),
    ("03_train_caption_lora", ["caption", "keep_tokens", "shuffle_caption"]),
    ("04_merge", ["concat", "svd", "ratio"]),
    ("05_extract", ["SVD", "rank", "error"]),
    ("06_generate", ["multiplier", "seed", "guidance"]),
    ("01_prepare_data", ["trigger", "repeats", "regularisation"]),
])
def test_teaching_text_covers_the_concepts(name, words):
    text = "\n".join(c.source for c in load(name).cells if c.cell_type == "markdown")
    for word in words:
        assert word in text, word


def _parameters(name) -> dict:
    cell = next(c for c in load(name).cells if c.cell_type == "code" and "parameters" in tags(c))
    values = {}
    exec(compile(cell.source, name, "exec"), {}, values)  # the parameters cell is plain assignments
    return values


def test_the_readme_s_first_command_trains_the_lora_the_notebooks_use():
    """`lorakit train --config data_examples/<lesson>.toml`, notebook 02/03 and the notebooks that use their LoRAs
    (04, 05, 06) name one file, so a LoRA trained either way is found by the others."""
    import tomllib

    root = NOTEBOOKS.parent
    lessons = {}
    for lesson in ("dreambooth", "captions"):
        toml = tomllib.loads((root / "data_examples" / f"{lesson}.toml").read_text())
        lessons[lesson] = f"{toml['output_dir']}/{toml['output_name']}.safetensors"
    readme = (root / "README.md").read_text()
    assert f"It writes `{lessons['dreambooth']}`" in readme
    # the README's examples that use a lesson's LoRA name the file the lesson writes
    named = re.findall(r"[\w./-]*(?:sks_shape|striped)\.safetensors", readme)
    assert named and set(named) <= set(lessons.values()), named
    p02, p03 = _parameters("02_train_dreambooth_lora"), _parameters("03_train_caption_lora")
    assert f"{p02['OUTPUT_DIR']}/{p02['OUTPUT_NAME']}.safetensors" == lessons["dreambooth"]
    assert f"{p03['OUTPUT_DIR']}/{p03['OUTPUT_NAME']}.safetensors" == lessons["captions"]
    assert (_parameters("04_merge")["LORA_A"], _parameters("04_merge")["LORA_B"]) == (lessons["dreambooth"],
                                                                                      lessons["captions"])
    assert _parameters("05_extract")["LORA"] == _parameters("06_generate")["LORA"] == lessons["dreambooth"]
