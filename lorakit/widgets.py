"""Notebook forms built from a job's config schema (ipywidgets 8: Jupyter, JupyterLab, VS Code, Colab).

`form(TrainConfig, preset=..., values=..., on_submit=lorakit.live.train_live)` turns every field of the job's config
dataclass (`JobConfig.specs()`) into one widget: its type picks the widget, its default fills it, its help text sits
next to it, its choices make a drop-down and its bounds are shown. Basic fields come first; the others are grouped
by their `group` in collapsible sections. There is no list of options here — add a field to the config and it
appears in the form, the CLI and the TOML files at once.

The form's `.value` is the validated config object. Values are checked on every edit and errors appear in red next
to the form, worded by the schema (`network_dim` must be ≥ 1, got 0) — never as a traceback. Out-of-range numbers are
shown as errors, not silently clamped. Without ipywidgets (a plain Python kernel, a headless run) `form()` returns a
`StaticForm` with the same `.value`/`.submit()` built from the parameters cell's values.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from .config import FieldSpec, JobConfig
from .errors import ConfigError, LorakitError
from .fileio import write_json
from .presets import presets_for

NO_PRESET = "(none)"
_AUTO = "(auto)"


def widgets_available() -> bool:
    """True when ipywidgets can be imported (the kernel may still lack a front end; that is harmless)."""
    if os.environ.get("LORAKIT_NO_WIDGETS"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def initial_values(cls: type[JobConfig], preset: str | None = None, values: dict | None = None) -> dict:
    """Schema defaults ← preset ← `values`, as plain field values (not yet validated)."""
    from .presets import preset as preset_values

    out = {s.name: s.default for s in cls.specs() if s.default is not MISSING}
    if preset and preset != NO_PRESET:
        out.update(preset_values(preset, cls))
    out.update(values or {})
    return out


def short_error(e: BaseException) -> str:
    """One line a user can act on, for errors shown in a form."""
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or e}"
    return str(e)


# ---------------------------------------------------------------------------------------------------------- fields
class FieldWidget:
    """One config field as one ipywidget, with the conversion between the widget's value and the field's value."""

    def __init__(self, spec: FieldSpec, value: Any):
        import ipywidgets as w

        self.spec = spec
        self.kind = self._kind(spec)
        style = {"description_width": "240px"}
        layout = w.Layout(width="520px")
        common = dict(description=spec.name, style=style, layout=layout, tooltip=spec.help)
        if self.kind == "checkbox":
            self.widget = w.Checkbox(value=False, indent=True, **common)
        elif self.kind == "dropdown":
            self.widget = w.Dropdown(options=self._options(spec), **common)
        elif self.kind == "int":
            self.widget = w.IntText(value=0, **common)
        elif self.kind == "float":
            self.widget = w.FloatText(value=0.0, **common)
        elif self.kind == "password":
            self.widget = w.Password(value="", placeholder="(from HF_TOKEN or login)", **common)
        else:
            placeholder = "comma-separated" if spec.type is list else ("(unset)" if spec.optional or
                                                                         spec.default is None else "")
            self.widget = w.Text(value="", placeholder=placeholder, **common)
        self.set(value)
        self.widget.add_class("lorakit-field")
        self.widget.add_class(f"lorakit-field-{spec.name}")
        self.help = w.HTML(f"<span style='color:#666;font-size:90%'>{html.escape(self._help_text(spec))}</span>")
        self.box = w.HBox([self.widget, self.help])

    @staticmethod
    def _kind(spec: FieldSpec) -> str:
        nullable = spec.optional or spec.default is None
        if spec.secret:
            return "password"
        if spec.choices is not None or (spec.type is bool and nullable):
            return "dropdown"
        if spec.type is bool:
            return "checkbox"
        if spec.type is int and not nullable:
            return "int"
        if spec.type is float and not nullable:
            return "float"
        return "text"

    @staticmethod
    def _options(spec: FieldSpec) -> list:
        if spec.choices is not None:
            opts = [(str(c), c) for c in spec.choices]
        else:  # an optional bool: auto-detected unless set
            opts = [("yes", True), ("no", False)]
        if spec.optional or spec.default is None:
            opts = [(_AUTO, None), *opts]
        return opts

    @staticmethod
    def _help_text(spec: FieldSpec) -> str:
        bounds = []
        if spec.min is not None:
            bounds.append(f"≥ {spec.min:g}")
        if spec.max is not None:
            bounds.append(f"≤ {spec.max:g}")
        return spec.help + (f" ({', '.join(bounds)})" if bounds else "")

    def _to_text(self, value) -> str:
        if value is None:
            return ""
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return str(value)

    def get(self):
        """The field's value as the schema expects it (strings are parsed by the schema, with its messages)."""
        v = self.widget.value
        if self.kind == "password":
            return v or None
        if self.kind != "text":
            return v
        v = v.strip()
        if self.spec.type is list:
            return [p.strip() for p in v.split(",") if p.strip()] if v else []
        if v == "" and (self.spec.optional or self.spec.default is None):
            return None
        return v

    def set(self, value) -> None:
        from traitlets import TraitError

        try:
            if self.kind == "text":
                self.widget.value = self._to_text(value)
            elif self.kind == "password":
                self.widget.value = value or ""
            else:
                self.widget.value = value
        except TraitError:
            allowed = f"one of {', '.join(map(str, self.spec.choices))}" if self.spec.choices else self.kind
            raise ConfigError(f"`{self.spec.name}` must be {allowed}, got {value!r}") from None


# ------------------------------------------------------------------------------------------------------------ form
class _RunResult:
    """`.result`: what the form's last run returned; asked for before a run succeeded, a one-line error (the cells
    after a stopped run otherwise fail with "'NoneType' object has no attribute 'lora_path'")."""

    _result = None

    @property
    def result(self):
        if self._result is None:
            raise ConfigError(f"the {self.cls.job} form has no result: it has not run yet, or its last run stopped "
                              f"(its message says why); run it first (its button, or `form.submit()`)")
        return self._result

    @result.setter
    def result(self, value) -> None:
        self._result = value


class Form(_RunResult):
    """An ipywidgets form for one job config. `.widget` is what is displayed; `.value` is the config."""

    def __init__(self, cls: type[JobConfig], *, preset: str | None = None, values: dict | None = None,
                 on_submit: Callable[[JobConfig], Any] | None = None, run_label: str | None = None,
                 toml_path: str | None = None, remember: str | None = None):
        import ipywidgets as w

        self.cls, self.on_submit, self.result, self.error = cls, on_submit, None, ""
        self._memory = memory_path(remember) if remember else None
        self._started_from = _jsonable({"preset": preset, "values": values or {}})
        self._quiet = False
        self._values = dict(values or {})  # the notebook's values: they win over any preset
        start = initial_values(cls, preset, values)
        self.specs = cls.spec_map()
        self.fields = {s.name: FieldWidget(s, start.get(s.name)) for s in cls.specs()}

        basic = [f.box for f in self.fields.values() if f.spec.basic]
        groups: dict[str, list] = {}
        for f in self.fields.values():
            if not f.spec.basic:
                groups.setdefault(f.spec.group, []).append(f.box)
        self.sections = w.Accordion(children=[w.VBox(boxes) for boxes in groups.values()],
                                    titles=[f"{g} ({len(b)})" for g, b in groups.items()], selected_index=None)

        names = list(presets_for(cls))
        self.preset = w.Dropdown(options=[NO_PRESET, *names], value=preset if preset in names else NO_PRESET,
                                 description="preset", style={"description_width": "240px"},
                                 layout=w.Layout(width="520px"))
        self.preset.observe(lambda ch: self.apply_preset(ch["new"]), names="value")
        self.toml_path = w.Text(value=toml_path or f"{cls.job}.toml", description="TOML file",
                                style={"description_width": "240px"}, layout=w.Layout(width="520px"))
        self.save_button = w.Button(description="Save TOML", icon="save")
        self.load_button = w.Button(description="Load TOML", icon="folder-open")
        self.save_button.on_click(lambda _b: self._guarded(self.save_toml))
        self.load_button.on_click(lambda _b: self._guarded(self.load_toml))
        self.run_button = w.Button(description=run_label or f"Run {cls.job}", button_style="success", icon="play",
                                   layout=w.Layout(width="200px"))
        self.run_button.add_class("lorakit-run")
        self.run_button.on_click(self._on_click)
        self.errors = w.HTML("")
        self.errors.add_class("lorakit-errors")
        self.status = w.HTML("")
        self.output = w.Output()
        header = [self.preset] if names else []
        self.widget = w.VBox([
            *header, *basic, self.sections,
            w.HBox([self.toml_path, self.save_button, self.load_button]),
            self.errors, w.HBox([self.run_button, self.status]), self.output,
        ])
        self.widget.add_class("lorakit-form")
        for f in self.fields.values():
            f.widget.observe(lambda _ch: self._revalidate(), names="value")
        self._applied = self.raw()  # the values the form was last filled with (to tell what the user changed)
        self._revalidate()
        self._restore()

    # ---------------------------------------------------------------- memory
    def _restore(self) -> None:
        """Put back what was changed in this form before it last ran (`remember`): Colab keeps no widget state, so
        after a disconnect "Run all" would otherwise train with the parameters cell's values instead. Only when the
        parameters cell is as it was then: a value changed there since wins."""
        saved = read_memory(self._memory) if self._memory else None
        if not saved or saved.get("started_from") != self._started_from:
            return
        changed = {k: v for k, v in saved.get("changed", {}).items() if k in self.fields}
        if not changed and saved.get("preset") == self.preset.value:
            return  # nothing was changed in the form
        if saved.get("preset") and saved["preset"] != self.preset.value and saved["preset"] in self.preset.options:
            self.apply_preset(saved["preset"])
        self.set(**changed)
        message = (f"restored the preset and {len(changed)} value(s) changed in this form before it last ran "
                   f"({', '.join(changed) or 'none'}); delete {self._memory} to start from the parameters cell")
        print(message)  # in the form cell's output: "Run all" then trains with these values
        self.status.value = html.escape(message)

    def _remember(self) -> dict | None:
        """Keep what was changed in the form (see `_restore`); returns what was kept before, to put back if this
        run is refused."""
        if self._memory is None:
            return None
        before = read_memory(self._memory)
        now = self.raw()
        changed = {k: v for k, v in now.items() if v != self._applied.get(k) and not self.specs[k].secret}
        write_json(self._memory, {"started_from": self._started_from, "preset": self.preset.value,
                                  "changed": _jsonable(changed)})
        return before

    def _forget(self, before: dict | None) -> None:
        """A run refused for bad input (fp16 without a GPU, a missing folder) is not one to continue: the values
        kept before it are put back, so the next Run-all does not make the same mistake again."""
        if self._memory is None:
            return
        if before is None:
            self._memory.unlink(missing_ok=True)
        else:
            write_json(self._memory, before)

    # ---------------------------------------------------------------- values
    def raw(self) -> dict:
        """Every field's current value, as given to `cls.from_dict` (so the schema's messages apply)."""
        return {name: f.get() for name, f in self.fields.items()}

    @property
    def value(self) -> JobConfig:
        """The validated config; raises `ConfigError` naming the field when a value is wrong."""
        return self.cls.from_dict(self.raw())

    def set(self, **values) -> Form:
        """Set some fields (by option name); the form re-validates once."""
        unknown = [k for k in values if k not in self.fields]
        if unknown:
            raise ConfigError(f"unknown option `{unknown[0]}` for `{self.cls.job}`")
        self._quiet = True
        try:
            for k, v in values.items():
                self.fields[k].set(v)
        finally:
            self._quiet = False
        self._revalidate()
        return self

    def load(self, cfg: JobConfig | dict) -> Form:
        """Fill the form from a config object or a dict of values."""
        return self.set(**(cfg.to_dict() if isinstance(cfg, JobConfig) else dict(cfg)))

    def apply_preset(self, name: str) -> None:
        """Fill the form as schema defaults ← the preset ← the notebook's values, as if it had been made with this
        preset: nothing of the previous preset carries over. A field you changed in the form keeps your value
        (e.g. your dataset folder)."""
        target = initial_values(self.cls, name, self._values)
        current = self.raw()
        changes = {k: target[k] for k in self.fields
                   if k in target and current[k] == self._applied.get(k) and current[k] != target[k]}
        self.set(**changes)
        self._applied = {**self._applied, **{k: self.fields[k].get() for k in changes}}
        self.status.value = f"preset: {html.escape(name)}" if name and name != NO_PRESET else ""
        if self.preset.value != (name or NO_PRESET):
            self.preset.value = name or NO_PRESET

    # ---------------------------------------------------------------- errors
    def show_error(self, message: str) -> None:
        self.error = message
        self.errors.value = ("" if not message else
                             f"<div class='lorakit-error' style='color:#b00020;font-weight:600'>⚠ "
                             f"{html.escape(message)}</div>")

    def check(self) -> JobConfig | None:
        """Validate and show the outcome next to the form: the config, or None with the error shown."""
        try:
            cfg = self.value
        except LorakitError as e:
            self.show_error(short_error(e))
            return None
        self.show_error("")
        return cfg

    def _revalidate(self) -> None:
        if not self._quiet:
            self.check()

    def _guarded(self, action: Callable[[], Any]):
        try:
            return action()
        except (LorakitError, OSError) as e:
            self.show_error(short_error(e))
            return None

    # ---------------------------------------------------------------- TOML
    def save_toml(self, path: str | os.PathLike | None = None) -> Path:
        """Save the (validated) config as TOML; `lorakit <job> --config file.toml` runs the same job."""
        path = Path(path or self.toml_path.value)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give the TOML file's name (e.g. {path / (self.cls.job + '.toml')})")
        out = self.value.save_toml(path)
        self.status.value = f"saved {html.escape(str(out))}"
        return out

    def load_toml(self, path: str | os.PathLike | None = None) -> JobConfig:
        """Fill the form from a TOML file (unknown keys and wrong types are reported)."""
        path = Path(path or self.toml_path.value)
        cfg = self.cls.from_toml(path)
        self.load(cfg)
        self.status.value = f"loaded {html.escape(str(path))}"
        return cfg

    # ---------------------------------------------------------------- run
    def submit(self, *, raise_errors: bool = True):
        """Validate, then call `on_submit(config)`; the same as clicking the run button.

        Bad input (`LorakitError`, a missing file) is shown next to the form; from a cell it is also raised so
        "Run all" stops there (lorakit's set-up makes that a one-line message, not a traceback).
        """
        from .colab import check_drive_paths

        self.show_error("")
        self.result = None  # a stopped run leaves no earlier run's result behind
        kept = remembering = None
        try:
            cfg = self.value
            check_drive_paths(cfg)
            kept, remembering = self._remember(), True
            self.status.value = "running…"
            self.result = self.on_submit(cfg) if self.on_submit is not None else cfg
        except (LorakitError, FileNotFoundError) as e:
            if remembering:
                self._forget(kept)
            self.show_error(short_error(e))
            self.status.value = "stopped"
            if raise_errors:
                raise
            return None
        except BaseException:  # the stop button, or a fault that is not bad input: shown as it is, the run stopped
            if remembering:
                self._forget(kept)
            self.status.value = "stopped"
            raise
        self.status.value = "done"
        return self._result

    def _on_click(self, _button=None) -> None:
        self.output.clear_output()
        self.run_button.disabled = True
        try:
            with self.output:
                self.submit(raise_errors=False)
        finally:
            self.run_button.disabled = False

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


class StaticForm(_RunResult):
    """The form's stand-in without ipywidgets: the config comes from the parameters cell; same `.value`/`.submit()`."""

    widget = None

    def __init__(self, cls: type[JobConfig], *, preset: str | None = None, values: dict | None = None,
                 on_submit: Callable[[JobConfig], Any] | None = None, **_ignored):
        self.cls, self.on_submit, self.result, self.error = cls, on_submit, None, ""
        self._values = initial_values(cls, preset, values)

    @property
    def value(self) -> JobConfig:
        return self.cls.from_dict(self._values)

    def set(self, **values) -> StaticForm:
        self._values.update(values)
        return self

    def submit(self, *, raise_errors: bool = True):
        from .colab import check_drive_paths

        self.result = None
        try:
            cfg = self.value
            check_drive_paths(cfg)
            self.result = self.on_submit(cfg) if self.on_submit is not None else cfg
        except (LorakitError, FileNotFoundError) as e:
            self.error = short_error(e)
            print(f"⚠ {self.error}")
            if raise_errors:
                raise
            return None
        return self._result

    def __repr__(self) -> str:
        try:
            body = self.value.to_toml()
        except LorakitError as e:
            body = f"⚠ {e}\n"
        return f"# {self.cls.job} options (widgets unavailable: edit the parameters cell)\n{body}"


def form(cls: type[JobConfig], preset: str | None = None, on_submit: Callable[[JobConfig], Any] | None = None, *,
         values: dict | None = None, run_label: str | None = None, use_widgets: bool | None = None,
         remember: str | None = None):
    """A form for `cls` (a job config class): an ipywidgets `Form`, or a `StaticForm` without ipywidgets.

    `preset` names one of `lorakit.presets.presets_for(cls)`; `values` (usually the notebook's parameters cell)
    override it; `on_submit(config)` runs when the run button is clicked or `.submit()` is called. `remember`: a
    name under which the values changed in the form are kept when it runs (`memory_path`, in the working folder:
    on Drive when mounted), and put back when the form is made again with the same parameters, so "Run all" after
    a disconnect continues the run the form started.
    """
    if use_widgets is None:
        use_widgets = widgets_available()
    kind = Form if use_widgets else StaticForm
    return kind(cls, preset=preset, values=values, on_submit=on_submit, run_label=run_label, remember=remember)


def memory_path(name: str) -> Path:
    """Where a form made with `remember=name` keeps its changed values (never a secret field's)."""
    return Path(".lorakit") / f"form-{name}.json"


def read_memory(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _jsonable(value):
    """`value` as JSON would give it back (paths as strings, tuples as lists), so that saved and current values
    compare equal."""
    import json

    return json.loads(json.dumps(value, default=str))
