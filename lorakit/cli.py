"""`lorakit <job> [--config file.toml] [--option value ...]` — flags derived from each job's config schema.

Precedence: schema default < TOML file < command-line flag. Errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
from pathlib import Path

from .config import JOB_CONFIGS, FieldSpec, JobConfig
from .config.schema import BOOL_WORDS, flat_toml, read_toml, toml_value
from .errors import ConfigError, LorakitError

# job name -> "module:function" taking the job's config object; imported only when the job runs
RUNNERS = {
    "train": "lorakit.cli:train_with_plot",
    "merge": "lorakit.merging:merge",
    "extract": "lorakit.extraction:extract",
    "generate": "lorakit.generation:generate",
    "prepare": "lorakit.dataprep:prepare",
    "push": "lorakit.hub:push_to_hub",
    "inspect": "lorakit.formats:inspect",
    "tiny": "lorakit.tiny:build_tiny_cli",
}


def _add_field(parser: argparse.ArgumentParser, spec: FieldSpec, positional: bool) -> None:
    help_text = spec.help + (f" [default: {spec.default}]" if spec.default not in (None, [], "") else "")
    if spec.optional and spec.type not in (bool, list):
        help_text += " ('none' unsets it)"
    help_text = help_text.replace("%", "%%")  # argparse formats help with %: "5%", "~30% slower"
    if positional:  # `lorakit inspect file.safetensors`, or `--path file.safetensors` as messages spell it
        parser.add_argument(spec.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        parser.add_argument(f"--{spec.name}", dest=spec.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    kw = dict(dest=spec.name, default=argparse.SUPPRESS, help=help_text)
    if spec.type is bool:
        parser.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, **kw)
    elif spec.type is list:
        # `--remove_tags a --remove_tags b` adds up, as `--remove_tags a b` does
        parser.add_argument(f"--{spec.name}", nargs="*", action="extend", metavar=spec.item_type.__name__.upper(),
                            **kw)
    else:
        metavar = "{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else spec.type.__name__.upper()
        parser.add_argument(f"--{spec.name}", metavar=metavar, **kw)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, as lorakit's own are (argparse prints the whole usage first:
    95 lines for `train`), with a pointer to `--help`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `--learning 5e-3` or `--overwrite` must not silently set the option they happen to prefix
    parser = _Parser(prog="lorakit", description="LoRA training kit for Stable Diffusion.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="job", metavar="<job>")
    for name, cls in JOB_CONFIGS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
                           description=(cls.__doc__ or "").strip() or None, allow_abbrev=False)
        p.add_argument("--config", "--config_file", dest="_config", metavar="FILE.toml", default=None,
                       help="Read options from a TOML file first (`--config_file`, as sd-scripts spells it, too).")
        p.add_argument("--dry_run", dest="_dry_run", action="store_true",
                       help="Validate and print the resolved config, then stop.")
        groups: dict[str, argparse._ArgumentGroup] = {}
        for spec in cls.specs():
            g = groups.setdefault(spec.group, p.add_argument_group(spec.group))
            _add_field(g, spec, spec.name in cls.positional)
    return parser


_SCRIPTS = {"train_network.py": "train", "gen_img.py": "generate", "gen_img_diffusers.py": "generate"}  # sd-scripts'
# scripts whose options a job reads


def _pasted(argv: list[str]) -> tuple[list[str], str | None]:
    """`argv` with what a pasted sd-scripts command line brings and lorakit does not need: the launcher and script
    before the options (`accelerate launch --num_cpu_threads_per_process 1 train_network.py --opt …`), and switches
    written with a value (`--shuffle_caption true`, as GUIs' configs spell them); and the script's name, if any."""
    name = None
    if len(argv) > 1 and argv[0] in JOB_CONFIGS:
        script = next((i for i, word in enumerate(argv[1:], 1)
                       if word.endswith(".py") and not argv[i - 1].startswith("--")), None)  # not an option's value
        if script is not None:
            name = Path(argv[script]).name
            if _SCRIPTS.get(name) != argv[0]:
                raise ConfigError(f"`lorakit {argv[0]}` does not read {name}'s options"
                                  + (f" (lorakit {_SCRIPTS[name]} does)" if name in _SCRIPTS else
                                     " (lorakit is for SD 1.x/2.x LoRAs: `lorakit train` reads train_network.py's "
                                     "options, `lorakit generate` gen_img.py's)"))
            print(f"note: reading the options of the pasted {name} command (the launcher before it is not needed)",
                  file=sys.stderr)
            argv = [argv[0], *argv[script + 1:]]
        switches = {s.name for s in JOB_CONFIGS[argv[0]].specs() if s.type is bool}
        out = []
        for word in argv:
            if out and out[-1].startswith("--") and out[-1][2:] in switches and word.lower() in BOOL_WORDS:
                out[-1] = out[-1] if BOOL_WORDS[word.lower()] else f"--no-{out[-1][2:]}"
                continue
            out.append(word)
        argv = out
    return argv, name


def parse_config(argv: list[str]) -> tuple[JobConfig, bool]:
    """Parse `argv` (without the program name) into (config, dry_run)."""
    argv, script = _pasted(argv)
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    ns = vars(namespace)
    job = ns.pop("job")
    if job is None:
        parser.print_help()
        raise SystemExit(2)
    cls = JOB_CONFIGS[job]
    where = " (on the command line)"
    foreign = _foreign_flags(cls, unknown, argv)
    for key, value in cls.resolve_foreign(foreign, where).items():
        ns[key] = cls.coerce(cls.spec(key), value, where)  # an alias of an option: `--caption_extention .txt`
    config_path, dry_run = ns.pop("_config"), ns.pop("_dry_run")
    cfg = cls.from_toml(config_path, overrides=ns) if config_path else cls.from_dict(ns, where="")
    if job == "train" and (script or "--config_file" in argv):  # brought from sd-scripts (its own spellings)
        given = set(ns) | {cls.aliases.get(k, k) for k in (flat_toml(config_path) if config_path else ())}
        if cfg.dataset_config and Path(cfg.dataset_config).is_file():  # its keys win over the options
            given |= _keys(read_toml(cfg.dataset_config))
        differ = cfg.sd_scripts_default_differences(given)
        if differ:
            print(f"note: lorakit's defaults, which differ from sd-scripts', apply to {len(differ)} option(s) this "
                  f"config leaves unset: {'; '.join(differ)}", file=sys.stderr)
    return cfg, dry_run


def _keys(data) -> set[str]:
    """Every key in a TOML document, at any depth (a dataset TOML's [general], [[datasets]], [[datasets.subsets]])."""
    if isinstance(data, list):
        return set().union(*map(_keys, data))
    return set(data).union(*map(_keys, data.values())) if isinstance(data, dict) else set()


def _foreign_flags(cls: type[JobConfig], unknown: list[str], argv: list[str]) -> dict:
    """The words argparse did not take, read as other tools' flags (`--network_module=networks.lora`,
    `--max_data_loader_n_workers 0`, `--zero_terminal_snr`) when the job's tables know them (sd-scripts users paste
    their command lines); anything else is an error naming the word, with the closest option."""
    known = set(getattr(cls, "aliases", {})) | set(getattr(cls, "ignored_options", {})) | set(
        getattr(cls, "unsupported_options", {}))
    flags, i = {}, 0
    while i < len(unknown):
        arg = unknown[i]
        name, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in known:
            raise ConfigError(_unknown_argument(cls, arg, argv))
        values = [text] if eq else []
        while not eq and i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
            i += 1
            values.append(unknown[i])
        flags[name] = True if not values else [toml_value(v) for v in values] if len(values) > 1 else toml_value(
            values[0])
        i += 1
    return flags


def _unknown_argument(cls: type[JobConfig], arg: str, argv: list[str]) -> str:
    """The message for a command-line word the job does not take, with the closest option when there is one."""
    at = len(argv) - 1 - argv[::-1].index(arg) if arg in argv else 0  # the stray one comes after the option's value
    if not arg.startswith("-") and at >= 2 and argv[at - 2].startswith("--"):  # `--text_encoder_lr 5e-5 1e-5`
        spec = cls.spec_map().get(argv[at - 2][2:])
        if spec is not None and spec.type not in (bool, list):
            return (f"`--{spec.name}` takes one value, got {argv[at - 1]!r} and then {arg!r}"
                    + (" (SD 1.x/2.x have one text encoder: one rate)" if spec.name == "text_encoder_lr" else ""))
    if not arg.startswith("-"):
        positional = ", ".join(f"<{name}>" for name in cls.positional)
        return (f"unexpected argument {arg!r} for `{cls.job}`"
                + (f" (it takes {positional} and --options)" if positional else " (options are written --name value)"))
    name = arg.lstrip("-").split("=", 1)[0]
    close = difflib.get_close_matches(name.removeprefix("no_"), [s.name for s in cls.specs()], n=1, cutoff=0.6)
    hint = f"; did you mean `--{close[0]}`?" if close else f"; see `lorakit {cls.job} --help`"
    return f"unknown option `{arg.split('=', 1)[0]}` for `{cls.job}`{hint}"


def _datasets_read(cfg) -> str:
    """For `train --dry_run`: the datasets as the run will read them (a dataset TOML checked, and its values shown:
    they win over the train options, as in sd-scripts), as TOML comments; the folders must exist."""
    from .data.dataset import dataset_layout
    from .data.folders import LoadReport

    if not cfg.dataset_config and not cfg.train_data_dir:
        return ""  # the options alone (a config being written)
    specs = dataset_layout(cfg, LoadReport())
    if not cfg.dataset_config:
        return ""

    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)

    lines = [f"\n# {cfg.dataset_config}, as this run reads it (its values win over the options above):"]
    for i, spec in enumerate(specs, 1):
        reso = f"{spec.resolution[0]}x{spec.resolution[1]}" if spec.resolution else "the model's size"
        buckets = (f" ({spec.min_bucket_reso}-{spec.max_bucket_reso}, step {spec.bucket_reso_steps})"
                   if spec.enable_bucket else "")
        lines.append(f"# [[datasets]] {i}: resolution {reso}, batch_size {spec.batch_size}, enable_bucket "
                     f"{shown(spec.enable_bucket)}{buckets}")
        for sub in spec.subsets:
            keys = ("num_repeats", "is_reg", "class_tokens", "caption_extension", "shuffle_caption", "keep_tokens",
                    "flip_aug")
            lines.append(f"#   {sub.image_dir}: " + ", ".join(f"{k} {shown(getattr(sub, k))}" for k in keys
                                                              if getattr(sub, k) is not None))
    return "\n".join(lines) + "\n"


def train_with_plot(cfg):
    """`lorakit train`: the run, then its loss curve as `<output_name>_loss.png` beside the LoRA (in a notebook the
    live view draws and saves it)."""
    from . import plots
    from .training import train

    result = train(cfg)
    if result.loss_history:
        path = plots.save_loss_plot(result.loss_history, result.output_dir / f"{cfg.output_name}_loss.png")
        print(f"saved the loss plot {path}", flush=True)
    return result


def run_job(cfg: JobConfig):
    module, func = RUNNERS[cfg.job].split(":")
    return getattr(importlib.import_module(module), func)(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, dry_run = parse_config(argv)
        if dry_run:
            print(cfg.to_toml() + (_datasets_read(cfg) if cfg.job == "train" else ""), end="")
            return 0
        run_job(cfg)
        sys.stdout.flush()  # here, so that a reader gone away is the BrokenPipeError below, not one at exit
    except BrokenPipeError:  # the output went to a reader that stopped (`lorakit inspect f | head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except LorakitError as e:
        print(f"lorakit {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"lorakit {argv[0] if argv else ''}: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file where a folder is expected, permissions, a full disk: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"lorakit {argv[0] if argv else ''}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
