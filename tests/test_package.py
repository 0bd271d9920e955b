"""The flat API: every exported verb resolves, and the verbs stay functions after their modules are imported."""

from __future__ import annotations

import importlib

import lorakit


def test_every_lazy_export_resolves():
    for name in lorakit._LAZY:
        assert getattr(lorakit, name) is not None, name


def test_verbs_are_not_shadowed_by_their_modules():
    for module in ("lorakit.training", "lorakit.merging", "lorakit.extraction", "lorakit.generation",
                   "lorakit.dataprep", "lorakit.hub"):
        importlib.import_module(module)
    for verb in ("train", "merge", "extract", "generate", "prepare", "push_to_hub"):
        assert callable(getattr(lorakit, verb)) and getattr(lorakit, verb).__name__ == verb


def test_cli_help_lists_every_job(capsys):
    import pytest

    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for job in ("train", "merge", "extract", "generate", "prepare", "push", "inspect", "tiny"):
        assert job in out
