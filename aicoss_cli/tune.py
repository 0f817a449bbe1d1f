"""Hyper-parameter search over a recipe with Optuna: what `aicoss tune` runs.

    from aicoss_cli.tune import TrialRecipes, load_space, tune
    recipes = TrialRecipes("recipes/starter.toml", data="data/own", epochs=3)
    space = load_space(None, recipes)            # the default space; or a space TOML file
    result = tune(recipes, space, trials=20, out="runs/tune", storage=None, study_name=None)

A search space is a list of `Param`s, one per recipe key (`optim.lr`, `augment.policy`...): a
range (`low`, `high`, optionally `log` or `step`; integer or float by the key's type) or a list of
`choices`, optionally sampled only `when` an earlier categorical parameter has given values.
`load_space` reads one from TOML and checks it against the recipe schema before any trial runs;
`default_space` builds the default one from the recipe and its data.

Every trial is a normal `aicoss train` run folder under `<out>/<study>/`, trained by the public
`Trainer`; a callback reports each epoch's val mAP to Optuna and ends the run when the median
pruner says so. The study lives in an Optuna storage (SQLite by default), so running the same
command again continues it; trials the study holds are never run again. At the end: a table of
the trials (`trials.csv`), the best recipe (`best.toml`) and a picture (`trials.png`).

Optuna is imported inside the functions that need it (the `tune` extra); a missing extra is a
one-line error naming the pip command. This module imports the engine (and so torch): the CLI
imports it inside the command.
"""

from __future__ import annotations

import copy
import csv
import difflib
import gc
import io
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.markup import escape

from aicoss_cli.checkpoint import check_writable_folder, write_text_atomic
from aicoss_cli.engine import Callback, Trainer
from aicoss_cli.errors import TrainingStopped, UserError
from aicoss_cli.recipe import SECTIONS, Recipe, read_toml, recipe_to_toml, resolve_recipe, validate_recipe

INSTALL = "pip install 'aicoss[tune]'"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
BEST_FILE, TRIALS_FILE, PICTURE_FILE, DB_FILE = "best.toml", "trials.csv", "trials.png", "tune.db"
BEST_HEADER = "# aicoss tune:"
TRIALS_HEADER = ("trial", "state", "val_map", "epochs", "seconds", "params", "run_dir", "note")
COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # matplotlib's cycle without its grey (pruned)
DEAD_NOTE = "its process ended before the trial did (killed or crashed)"
STUDY_ATTR = "aicoss"  # the study's user attribute holding what it was started with
# keys a search may not change: they name the run or define the val split every trial is scored on
FIXED_KEYS = {"name": "it names the runs", "description": "it describes the recipe",
              "optim.epochs": "use --epochs"}
FIXED_SECTIONS = {"data": "it defines the val split every trial is scored on"}


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"aicoss tune needs Optuna: {INSTALL}") from None
    return optuna


# --------------------------------------------------------------------------- the search space


Value = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One searched recipe key: a range (`low`..`high`, `log`, `step`) or `choices`; `when` maps
    an earlier categorical key to the values under which this one is sampled."""

    key: str
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Value, ...] = ()
    when: tuple[tuple[str, tuple[Value, ...]], ...] = ()

    def suggest(self, trial) -> Value:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def applies(self, values: dict[str, Value]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when)

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        what = ("log-uniform" if self.log else "uniform") if self.kind == "float" else (
            "integer, log" if self.log else "integer")
        step = f", step {_show(self.step)}" if self.step else ""
        return f"{what} {_show(self.low)} … {_show(self.high)}{step}"

    def describe_when(self) -> str:
        return "; ".join(f"{key} in {{{', '.join(_show(v) for v in allowed)}}}" for key, allowed in self.when)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        if self.kind == "categorical":
            data["choices"] = list(self.choices)
        else:
            data.update(low=self.low, high=self.high, log=self.log, step=self.step)
        if self.when:
            data["when"] = {k: list(v) for k, v in self.when}
        return data


class TuneSettings(BaseModel):
    """[tune] of a space file: the sampler and the pruner."""

    model_config = ConfigDict(extra="forbid")

    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe (Optuna's default) or random")
    seed: int | None = Field(None, ge=0, lt=2**32, description="sampler seed (numpy's range); unset: a fresh one "
                             "every run")
    pruner: Literal["median", "none"] = Field("median", description="median: stop a trial whose val mAP is "
                                              "below the median of the completed trials at the same epoch")
    startup_trials: int = Field(5, ge=0, description="no pruning until this many trials have completed")
    min_epochs: int | None = Field(None, ge=1, description="no pruning before a trial has run this many epochs; "
                                   "default 1 + the longest warm-up in the space")


@dataclass
class Space:
    params: list[Param]
    settings: TuneSettings
    source: str  # "the default space" or the space file

    @property
    def min_epochs(self) -> int:
        if self.settings.min_epochs is not None:
            return self.settings.min_epochs
        warmup = next((p for p in self.params if p.key == "optim.warmup_epochs"), None)
        longest = 0 if warmup is None else int(max(warmup.choices) if warmup.kind == "categorical" else warmup.high)
        return 1 + longest

    def as_dict(self) -> dict[str, Any]:
        return {"params": {p.key: p.as_dict() for p in self.params}, "tune": self.settings.model_dump()}

    def ordered(self) -> list[Param]:
        """Unconditional parameters first: a condition refers to a value already drawn."""
        return [p for p in self.params if not p.when] + [p for p in self.params if p.when]


def default_space(recipes: TrialRecipes) -> Space:
    """lr log-uniform a decade either side of the recipe's (not below its min_lr), weight decay
    log-uniform 1e-6…0.1, augmentation policy and strength, warm-up up to half the trial's epochs
    (at most 2), and, where train.csv has -1 labels, the loss and P-ASL's partial mode."""
    base, epochs = recipes.base, recipes.epochs
    lr = base.optim.lr
    weak = (("augment.policy", ("weak",)),)
    params = [
        Param("optim.lr", "float", _round(max(lr / 10, base.optim.min_lr)), _round(lr * 10), log=True),
        Param("optim.weight_decay", "float", 1e-6, 0.1, log=True),
        Param("augment.policy", "categorical", choices=("none", "weak", "strong")),
        Param("augment.magnitude", "int", 1, 15, when=weak),
        Param("augment.num_ops", "int", 1, 3, when=weak),
        Param("augment.cutout_factor", "float", 0.0, 0.5, when=(("augment.policy", ("weak", "strong")),)),
    ]
    if epochs >= 2:
        params.append(Param("optim.warmup_epochs", "int", 0, min(2, epochs // 2)))
    if recipes.partial_labels:
        params.append(Param("loss.name", "categorical", choices=("bce", "asl", "partial_selective")))
        params.append(Param("loss.partial_mode", "categorical", choices=("negative", "ignore", "selective"),
                            when=(("loss.name", ("partial_selective",)),)))
    return Space(params, TuneSettings(), "the default space")


def _round(value: float) -> float:
    return float(f"{value:.3g}")


class _Entry(BaseModel):
    """One [section.key] table of a space file."""

    model_config = ConfigDict(extra="forbid")

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[bool | int | float | str] | None = None
    when: dict[str, bool | int | float | str | list[bool | int | float | str]] | None = None


def load_space(path: str | Path | None, recipes: TrialRecipes) -> Space:
    """The default space (`path` None) or a space TOML file, checked: every key a recipe key that a
    search may change, every range non-empty, every value one the recipe schema accepts. A bad
    space is a one-line UserError naming the file and the entry."""
    if path is None:
        space = default_space(recipes)
    else:
        space = _parse_space(Path(path), recipes)
    check_space(space, recipes)
    return space


def _parse_space(path: Path, recipes: TrialRecipes) -> Space:
    raw = read_toml(path, "search space file not found")
    src = str(path)
    extends = raw.pop("extends", None)
    if extends not in (None, "default"):
        raise UserError(f"{src}: extends must be \"default\" (got {_show(extends)}); leave it out to search only "
                        "the entries in this file")
    settings = _settings(src, raw.pop("tune", {}))
    entries: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in SECTIONS:
            if section in FIXED_KEYS:
                _check_key(src, section)
            raise UserError(f"{src}: unknown section [{section}]; entries look like [optim.lr] with a recipe section "
                            f"({', '.join(SECTIONS)}), and [tune] holds the sampler and pruner"
                            f"{_close(section, [*SECTIONS, 'tune'])}")
        if not isinstance(table, dict):
            raise UserError(f"{src}: {section} = {_show(table)}: entries are tables such as [{section}.<key>]")
        for key, entry in table.items():
            entries[f"{section}.{key}"] = entry
    params = {p.key: p for p in default_space(recipes).params} if extends == "default" else {}
    for key, entry in entries.items():
        params[key] = _param(src, key, entry)
    if not params:
        raise UserError(f"{src}: the space has no parameter; add an entry such as [optim.lr] low = 1e-4, high = 1e-2, "
                        "log = true")
    return Space(list(params.values()), settings, src)


def _settings(src: str, raw: Any) -> TuneSettings:
    if not isinstance(raw, dict):
        raise UserError(f"{src}: [tune] must be a table ({', '.join(TuneSettings.model_fields)})")
    try:
        return TuneSettings.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UserError(f"{src}: [tune] unknown key {key!r}; it takes {', '.join(TuneSettings.model_fields)}"
                            f"{_close(key, list(TuneSettings.model_fields))}") from None
        raise UserError(f"{src}: [tune] {key}: {err['msg'][0].lower()}{err['msg'][1:]}{_got(err)}") from None


def _param(src: str, key: str, entry: Any) -> Param:
    where = f"{src}: [{key}]"
    _check_key(src, key)
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a table with low and high, or choices (got {_show(entry)}), e.g. "
                        f"[{key}] choices = [...]")
    try:
        e = _Entry.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "entry"
        if err["type"] == "extra_forbidden":
            raise UserError(f"{where} unknown key {name!r}; an entry has low, high, log, step, choices, when"
                            f"{_close(name, list(_Entry.model_fields))}") from None
        raise UserError(f"{where} {name}: {err['msg'].lower()}{_got(err)}") from None
    kind = _field_kind(key)
    when = _when(where, e.when)
    if e.choices is not None:
        if e.low is not None or e.high is not None or e.step is not None or e.log:
            raise UserError(f"{where} has both choices and a range; give one of them")
        if not e.choices:
            raise UserError(f"{where} choices is empty; list at least one value")
        bad = [c for c in e.choices if isinstance(c, float) and not math.isfinite(c)]
        if bad:
            raise UserError(f"{where} choices holds {_show(bad[0])}; give finite numbers")
        if len({json.dumps(c) for c in e.choices}) < len(e.choices):
            raise UserError(f"{where} choices lists a value twice ({', '.join(_show(c) for c in e.choices)})")
        return Param(key, "categorical", choices=tuple(e.choices), when=when)
    if e.low is None or e.high is None:
        missing = "low" if e.low is None else "high"
        raise UserError(f"{where} has no {missing}; a range needs low and high (or give choices = [...])")
    if kind is None:
        raise UserError(f"{where} is not a number, so it has no range; list the values: choices = [...]")
    for name, value in (("low", e.low), ("high", e.high), ("step", e.step)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{where} {name} = {_show(value)}; give a finite number")
        if kind == "int" and value is not None and not isinstance(value, int):
            raise UserError(f"{where} {name} = {_show(value)}: {key} is an integer; give integers (or choices)")
    if not e.low < e.high:
        raise UserError(f"{where} is an empty range: low ({_show(e.low)}) must be below high ({_show(e.high)}); "
                        "to fix one value, set it in the recipe instead")
    if e.log and e.low <= 0:
        raise UserError(f"{where} log = true needs low > 0 (got {_show(e.low)})")
    if e.log and e.step is not None:
        raise UserError(f"{where} has both log and step; Optuna takes one of them")
    if e.step is not None and not 0 < e.step <= e.high - e.low:
        raise UserError(f"{where} step must be > 0 and at most high - low (got {_show(e.step)})")
    low, high = (e.low, e.high) if kind == "int" else (float(e.low), float(e.high))
    step = e.step if kind == "int" or e.step is None else float(e.step)
    return Param(key, kind, low, high, log=e.log, step=step, when=when)


def _when(where: str, raw: dict[str, Any] | None) -> tuple[tuple[str, tuple[Value, ...]], ...]:
    if not raw:
        return ()
    out = []
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{where} when {key!r} lists no value")
        out.append((key, tuple(values)))
    return tuple(out)


def _check_key(src: str, key: str) -> None:
    """`key` must be a recipe key (section.key) that a search may change."""
    parts = key.split(".")
    if key in FIXED_KEYS:
        raise UserError(f"{src}: [{key}] cannot be searched ({FIXED_KEYS[key]})")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"{src}: unknown key {key!r}; entries are recipe keys such as [optim.lr] or "
                        f"[augment.policy]{_close(key, _all_keys())}")
    section, name = parts
    fields = Recipe.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    if name not in fields:
        raise UserError(f"{src}: unknown key [{key}]{_close(name, list(fields), prefix=section + '.')}")
    if section in FIXED_SECTIONS:
        raise UserError(f"{src}: [{key}] cannot be searched ({FIXED_SECTIONS[section]})")


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in Recipe.model_fields[s].annotation.model_fields]  # type: ignore[union-attr]


def _field_kind(key: str) -> Literal["int", "float"] | None:
    """int or float for a numeric recipe key (None allowed), else None (categorical only)."""
    section, name = key.split(".")
    annotation = Recipe.model_fields[section].annotation.model_fields[name].annotation  # type: ignore[union-attr]
    kinds = set()
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is not None and get_args(arg):  # Annotated[float, ...]
            arg = get_args(arg)[0]
        if arg is type(None):
            continue
        kinds.add(arg)
    if kinds == {int}:
        return "int"
    if kinds == {float}:
        return "float"
    return None


def check_space(space: Space, recipes: TrialRecipes) -> None:
    """Conditions refer to categorical parameters of the space, and every bound and choice (with
    the first value its condition allows) gives a recipe the schema accepts."""
    by_key = {p.key: p for p in space.params}
    for p in space.params:
        for key, allowed in p.when:
            cond = by_key.get(key)
            where = f"{space.source}: [{p.key}] when"
            if cond is None:
                raise UserError(f"{where} refers to {key!r}, which the space does not search; add [{key}] or drop "
                                "the condition")
            if cond.kind != "categorical" or cond.when:
                raise UserError(f"{where} refers to {key!r}; a condition needs a parameter with choices and no "
                                "condition of its own")
            if not any(v in cond.choices for v in allowed):  # it would never be sampled
                raise UserError(f"{where} {key} in {{{', '.join(_show(v) for v in allowed)}}}: none of these is one "
                                f"of its choices ({', '.join(_show(c) for c in cond.choices)})")
    for p in space.params:
        context = {key: next(v for v in allowed if v in by_key[key].choices) for key, allowed in p.when}
        probes = p.choices if p.kind == "categorical" else (p.low, p.high)
        for value in probes:
            label = "choice" if p.kind == "categorical" else ("low" if value == p.low else "high")
            recipes.build({**context, p.key: value}, source=f"{space.source}: [{p.key}] {label} {_show(value)}")


# --------------------------------------------------------------------------- trial recipes


class TrialRecipes:
    """The recipe of every trial: the RECIPE file with `--epochs` and `--data`, and the values a
    trial drew set on it exactly as `aicoss train RECIPE --set key=value` would."""

    def __init__(self, path: str | Path, data: str | Path | None = None, epochs: int | None = None):
        from aicoss_cli.recipe import check_recipe_names

        self.path, self.data = Path(path), data
        self.raw = read_toml(self.path, "recipe file not found (see `aicoss recipes` for the bundled ones)")
        as_written = validate_recipe(self.raw, str(self.path))
        check_recipe_names(as_written, str(self.path))
        self.recipe_epochs = as_written.optim.epochs
        self.epochs = epochs or self.recipe_epochs
        self.notes: list[str] = []
        optim = self.raw.setdefault("optim", {})
        optim["epochs"] = self.epochs
        warmup = as_written.optim.warmup_epochs
        if warmup >= self.epochs:  # --epochs shorter than the recipe's warm-up
            optim["warmup_epochs"] = self.epochs - 1
            self.notes.append(f"--epochs {self.epochs}: [optim] warmup_epochs {warmup} → {self.epochs - 1} for the "
                              "trials (it must be less than epochs)")
        self.base = self.build({}, source=f"{self.path} with --epochs {self.epochs}")
        self.partial_labels = False  # set by `inspect_data`

    def inspect_data(self, progress=None):
        """Check the data once, before any trial (CSVs, labels, split, every image); returns the split."""
        from aicoss_cli.data import prepare_data

        prepared = prepare_data(self.base, progress)
        self.partial_labels = bool((prepared.table.labels < 0).any())
        return prepared

    def build(self, values: dict[str, Value], source: str, name: str | None = None) -> Recipe:
        """The base recipe with `values` (recipe keys → values) set, validated and resolved; a loss
        changed by `values` drops the recipe's parameters of the other loss."""
        from aicoss_cli.losses import loss_param_defaults, resolve_loss_name
        from aicoss_cli.recipe import check_recipe_names

        raw = copy.deepcopy(self.raw)
        if name is not None:
            raw["name"] = name
        new_loss = values.get("loss.name")
        if new_loss is not None and isinstance(raw.get("loss"), dict):
            try:
                accepted = set(loss_param_defaults(resolve_loss_name(str(new_loss))))
            except UserError as exc:
                raise UserError(f"{source}: {exc}") from None
            raw["loss"] = {k: v for k, v in raw["loss"].items() if k in accepted or k in ("name", "prior")}
        for key, value in values.items():
            section, item = key.split(".")
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise UserError(f"{self.path}: [{section}] is not a table")
            table[item] = value
        recipe = validate_recipe(raw, source)
        check_recipe_names(recipe, source)
        return resolve_recipe(recipe, data_root=self.data)

    def best_recipe(self, values: dict[str, Value], description: str) -> Recipe:
        """The best trial's recipe to train for real: the recipe's own name (+ "_tuned") and epochs."""
        name = (self.base.name[:110] + "_tuned")
        recipe = self.build(values, source="the best trial", name=name)
        full = recipe.model_copy(deep=True)
        try:
            full.optim.epochs = max(self.recipe_epochs, recipe.optim.warmup_epochs + 1)
        except ValidationError:
            full = recipe
        full.description = description
        return full


# --------------------------------------------------------------------------- the study


@dataclass
class TrialRow:
    """What the table, trials.csv and the picture show of one trial."""

    number: int
    state: str  # complete | pruned | diverged | failed | interrupted | killed | running | waiting
    value: float | None  # best val mAP (complete), last reported (pruned)
    curve: list[float]  # val mAP per epoch, as reported
    params: dict[str, Value]
    run_dir: str
    seconds: float | None
    baseline: bool
    note: str = ""


@dataclass
class TuneResult:
    study: str
    storage: str
    study_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ran: int = 0


def default_study_name(recipes: TrialRecipes) -> str:
    """<recipe name>-<data folder name>: the same command resumes the same study."""
    data = Path(recipes.base.data.root).resolve().name
    clean = "".join(ch if ch.isalnum() or ch in "_.+-" else "_" for ch in data).strip("_.+-")
    return f"{recipes.base.name}-{clean}"[:120] if clean else recipes.base.name


def check_study_name(name: str) -> str:
    import re

    if not re.match(NAME_PATTERN, name) or len(name) > 120:
        raise UserError(f"--study {name!r}: use letters, digits and _ . + - (it names a folder), at most 120")
    return name


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def open_storage(url: str):
    """An Optuna RDB storage; a SQLite file's folder is created. One-line error if it cannot be opened."""
    optuna = import_optuna()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:
        raise UserError(f"--storage {url}: its database driver is not installed ({exc.name or exc}); install it, "
                        "e.g. pip install psycopg2-binary for postgresql://") from None
    except Exception as exc:  # SQLAlchemy's URL and connection errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {url}: cannot open it ({type(exc).__name__}: {first}); give a database URL such "
                        "as sqlite:///runs/tune.db or postgresql://user@host/db") from None


def study_setup(recipes: TrialRecipes, space: Space, split: dict[str, Any]) -> dict[str, Any]:
    """What a study is started with; resuming it with anything else is refused."""
    base = recipes.base.model_copy(deep=True)
    base.data.root = ""  # the same data may be mounted elsewhere on another machine: compared by its split
    setup = {"recipe": recipe_to_toml(base), "space": space.as_dict()["params"],
             "val_fingerprint": split.get("val_fingerprint"), "n_rows": split.get("n_rows")}
    return json.loads(json.dumps(setup))  # as the storage gives it back


def _setup_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = {"recipe": "recipe (or --epochs)", "space": "search space (--space)",
             "val_fingerprint": "data (its train/val split)", "n_rows": "data (train.csv rows)"}
    return list(dict.fromkeys(names[k] for k in names if old.get(k) != new.get(k)))


def mark_dead_trials(study, storage) -> list[int]:
    """Trials left 'running' by a process of this machine that no longer exists (killed, crashed)
    are marked failed; trials of other machines are left alone."""
    optuna = import_optuna()
    host, dead = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or _alive(pid):
            continue
        storage.set_trial_user_attr(t._trial_id, "note", DEAD_NOTE)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        dead.append(t.number)
    return dead


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ReportToOptuna(Callback):
    """Trainer callback: each epoch's val mAP to the trial; ends the run when the pruner says so
    (never at the last epoch, when there is nothing left to save)."""

    def __init__(self, trial, epochs: int):
        self.trial, self.epochs, self.pruned_at, self.last = trial, epochs, None, math.nan

    def on_run_start(self, trainer) -> None:
        self.trial.set_user_attr("run_dir", str(trainer.run_dir))

    def on_epoch_end(self, trainer, row) -> bool:
        from aicoss_cli import keep

        value, epoch = keep.score(row), int(row["epoch"])
        if not math.isfinite(value):
            return False
        self.trial.report(value, epoch)
        self.last = value
        if epoch < self.epochs and self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False


def tune(recipes: TrialRecipes, space: Space, *, trials: int, out: str | Path, storage: str | None = None,
         study_name: str | None = None, timeout: float | None = None, console=None,
         say: Callable[[str], None] | None = None, split: dict[str, Any] | None = None) -> TuneResult:
    """Run trials until the study holds `trials` finished (complete or pruned) ones, or `timeout`
    seconds have passed (no trial starts after that); write trials.csv, best.toml and trials.png
    into <out>/<study>/. Ctrl-C stops the running trial (TrainingStopped, exit code 130) after the
    files are written; the same call continues the study."""
    optuna = import_optuna()
    say = say or (lambda text: None)
    out = Path(out)
    name = check_study_name(study_name or default_study_name(recipes))
    url = storage or sqlite_url(out / DB_FILE)
    study_dir = out / name
    check_writable_folder(out)
    _check_own_files(study_dir)
    db = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = study_setup(recipes, space, split or {})
    study = optuna.create_study(study_name=name, storage=db, direction="maximize", load_if_exists=True,
                                sampler=_sampler(optuna, space.settings), pruner=_pruner(optuna, space))
    old = study.user_attrs.get(STUDY_ATTR)
    if old is None:
        study.set_user_attr(STUDY_ATTR, setup)
    elif old != setup:
        raise UserError(f"study {name!r} in {url} was started with another "
                        f"{' and '.join(_setup_changes(old, setup))}; run it with the settings it started with, or "
                        "start a new one with --study NAME")
    notes = list(recipes.notes)
    dead = mark_dead_trials(study, db)
    if dead:
        notes.append(f"trial{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} had stopped with "
                     "its process: marked failed, not counted")
    fixed = _baseline_values(space, recipes.base)
    if fixed is not None and not any(t.user_attrs.get("baseline") and t.state != optuna.trial.TrialState.FAIL
                                     for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(fixed, user_attrs={"baseline": True})  # again if it was cut off
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=done_states))
    say(f"study {name} ({url}): {finished} of {trials} trials finished" +
        (f"; running up to {trials - finished} more" if finished < trials else "; nothing to run"))
    started, ran = time.monotonic(), 0
    interrupted: TrainingStopped | None = None
    try:
        for _ in range(max(trials - finished, 0)):
            if timeout is not None and time.monotonic() - started >= timeout:
                notes.append(f"--timeout {timeout:g} s reached: no further trial started")
                break
            if len(study.get_trials(deepcopy=False, states=done_states)) >= trials:
                break  # other machines finished the study
            ran += 1
            _run_trial(optuna, study, recipes, space, study_dir, console, say)
    except TrainingStopped as exc:
        if exc.exit_code != 130:
            raise
        interrupted = exc
    except KeyboardInterrupt:  # between two trials
        interrupted = TrainingStopped("interrupted", exit_code=130)
    rows = trial_rows(study)
    result = TuneResult(name, url, study_dir, rows, _best(rows), notes=notes, ran=ran)
    if any(r.state in ("complete", "pruned", "diverged") for r in rows):
        result.files = write_outputs(result, recipes, space)
    if interrupted is not None:
        finished = sum(r.state in ("complete", "pruned", "diverged") for r in rows)
        raise TrainingStopped(f"interrupted; the study keeps its {finished} finished trial{'' if finished == 1 else 's'}"
                              ": run the same command to go on", exit_code=130)
    return result


def _sampler(optuna, settings: TuneSettings):
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def _pruner(optuna, space: Space):
    if space.settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=space.settings.startup_trials,
                                       n_warmup_steps=space.min_epochs)


def _baseline_values(space: Space, base: Recipe) -> dict[str, Value] | None:
    """Trial 0: the recipe's own value of every searched key, also outside a range (it is the
    recipe as written); None when one cannot be given (a choice the space lacks, 0 on a log scale)."""
    values: dict[str, Value] = {}
    for p in space.ordered():
        if not p.applies(values):
            continue
        section, key = p.key.split(".")
        value = getattr(getattr(base, section), key)
        if p.kind == "categorical":
            if value not in p.choices:
                return None
        elif value is None or isinstance(value, bool) or (p.log and value <= 0) or (
                p.kind == "int" and not isinstance(value, int)):
            return None
        values[p.key] = value
    return values


@dataclass
class _Outcome:
    state: str  # COMPLETE | PRUNED | FAIL (Optuna's TrialState names)
    value: float | None = None
    note: str = ""
    message: str = ""


def _run_trial(optuna, study, recipes: TrialRecipes, space: Space, study_dir: Path, console, say) -> None:
    """Ask for a trial, train it, tell its outcome (once, whatever happens). A stop of the whole
    study (Ctrl-C, a bad image, a UserError, a bug) is told as a failed trial and raised."""
    TrialState = optuna.trial.TrialState
    trial = study.ask()
    try:
        outcome = _train_trial(trial, recipes, space, study_dir, console, say)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, TrainingStopped) and exc.exit_code == 130)
        trial.set_user_attr("note", "interrupted" if stopped else f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(exc, KeyboardInterrupt):
            raise TrainingStopped("interrupted", exit_code=130) from None
        raise
    if outcome.note:
        trial.set_user_attr("note", outcome.note[:500])
    if outcome.state == "COMPLETE":
        study.tell(trial, outcome.value)
        best = study.best_trial
        outcome.message += ("  [green](best so far)[/]" if best.number == trial.number
                            else f"  (best: trial {best.number}, {best.value:.4f})")
    else:
        study.tell(trial, state=getattr(TrialState, outcome.state))
    say(f"trial {trial.number} {outcome.message}")


def _train_trial(trial, recipes: TrialRecipes, space: Space, study_dir: Path, console, say) -> _Outcome:
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    values: dict[str, Value] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Fixed parameter")  # trial 0 keeps the recipe's own values
        for p in space.ordered():
            if p.applies(values):
                values[p.key] = p.suggest(trial)
    shown = "  ".join(f"{k}={_show(v)}" for k, v in values.items())
    baseline = " (the recipe as written)" if trial.user_attrs.get("baseline") else ""
    say(f"[bold]trial {trial.number}[/]{baseline}: {escape(shown)}")
    try:
        recipe = recipes.build(values, source=f"trial {trial.number}",
                               name=f"{recipes.base.name[:100]}_t{trial.number:03d}")
    except UserError as exc:  # a combination the schema rejects (two searched keys that clash)
        return _Outcome("FAIL", note=str(exc), message=f"[red]failed[/]: {escape(str(exc))}")
    callback = _ReportToOptuna(trial, recipe.optim.epochs)
    t0 = time.perf_counter()
    try:
        result = Trainer(recipe, study_dir, console=console, callbacks=[callback]).run()
    except TrainingStopped as exc:
        # a non-finite loss: these values diverged, a bad outcome rather than a broken study; any other
        # stop (Ctrl-C, an unreadable image, a full disk) stops the study. TrainingStopped carries no
        # reason code, so the engine's message (run_folder.nonfinite_loss) tells them apart.
        if not str(exc).startswith("non-finite loss"):
            raise
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        return _Outcome("PRUNED", note=f"diverged: {exc}", message=f"[yellow]diverged[/] (counted as pruned): "
                        f"{escape(str(exc))}")
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        return _Outcome("FAIL", note=f"out of memory: {str(exc).splitlines()[0] if str(exc) else ''}",
                        message="[red]failed[/]: out of memory with these values")
    finally:
        gc.collect()
        _empty_cuda_cache()
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    if callback.pruned_at is not None:
        return _Outcome("PRUNED", message=f"[yellow]pruned[/] after epoch {callback.pruned_at}: val mAP "
                        f"{callback.last:.4f} is below the median of the completed trials at that epoch")
    if not math.isfinite(result.best_map):
        return _Outcome("FAIL", note="no epoch gave a finite val mAP", message="[red]failed[/]: no epoch gave a "
                        "finite val mAP")
    return _Outcome("COMPLETE", value=result.best_map, message=f"complete: val mAP {result.best_map:.4f} "
                    f"(epoch {result.best_epoch})")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trial_rows(study) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        note = str(t.user_attrs.get("note", ""))
        if state == "pruned" and note.startswith("diverged"):
            state = "diverged"
        if state == "fail":
            state = "interrupted" if note == "interrupted" else "killed" if note.startswith(DEAD_NOTE) else "failed"
        curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        value = t.value if state == "complete" else (curve[-1] if curve and state == "pruned" else None)
        rows.append(TrialRow(t.number, state, value, curve, dict(t.params), str(t.user_attrs.get("run_dir", "")),
                             t.user_attrs.get("seconds"), bool(t.user_attrs.get("baseline")), note))
    return rows


def _best(rows: Sequence[TrialRow]) -> TrialRow | None:
    complete = [r for r in rows if r.state == "complete" and r.value is not None]
    return max(complete, key=lambda r: (r.value, -r.number)) if complete else None


# --------------------------------------------------------------------------- what the study leaves


def _check_own_files(study_dir: Path) -> None:
    """trials.csv, best.toml and trials.png are rewritten after every run of the study; a file of
    that name that this command did not write is never replaced."""
    from aicoss_cli.report import is_report_picture

    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"{study_dir}: is a file; choose another --out or --study")
    checks = {BEST_FILE: lambda p: p.read_text(encoding="utf-8", errors="replace").startswith(BEST_HEADER),
              TRIALS_FILE: lambda p: p.read_text(encoding="utf-8", errors="replace").startswith(",".join(TRIALS_HEADER)),
              PICTURE_FILE: is_report_picture}
    for file, ours in checks.items():
        path = study_dir / file
        if path.exists() and not (path.is_file() and ours(path)):
            raise UserError(f"{path}: exists and was not written by aicoss tune; move it, or choose another --out "
                            "or --study")


def write_outputs(result: TuneResult, recipes: TrialRecipes, space: Space) -> dict[str, Path]:
    files = {"trials": result.study_dir / TRIALS_FILE}
    write_text_atomic(files["trials"], trials_csv(result.rows))
    best = result.best
    if best is not None:
        baseline = next((r for r in result.rows if r.baseline and r.state in ("complete", "pruned")), None)
        versus = f" (the recipe as written, trial {baseline.number}: {baseline.value:.4f})" \
            if baseline is not None and baseline.value is not None else ""
        description = (f"aicoss tune study {result.study}, trial {best.number}: val mAP {best.value:.4f} at "
                       f"{recipes.epochs} epochs")
        recipe = recipes.best_recipe(best.params, description)
        header = [f"{BEST_HEADER} study {result.study!r}, trial {best.number} of {len(result.rows)}, val mAP "
                  f"{best.value:.4f} after {recipes.epochs} epochs{versus}.",
                  f"# Epochs set to {recipe.optim.epochs} (the recipe's own). Train it:",
                  f"#   aicoss train {_one_line(str(result.study_dir / BEST_FILE))}"]
        files["best"] = result.study_dir / BEST_FILE
        write_text_atomic(files["best"], "\n".join(header) + "\n" + recipe_to_toml(recipe))
    try:
        files["picture"] = draw_trials(result.rows, result.study_dir / PICTURE_FILE, result.study)
    except Exception as exc:  # a picture must not lose the study's table and recipe
        result.notes.append(f"{PICTURE_FILE} not drawn ({type(exc).__name__}: {exc})")
    return files


def trials_csv(rows: Sequence[TrialRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRIALS_HEADER)
    for r in rows:
        writer.writerow([r.number, r.state, "" if r.value is None else f"{r.value:.6g}", len(r.curve),
                         "" if r.seconds is None else r.seconds, json.dumps(r.params, sort_keys=True), r.run_dir,
                         r.note])
    return buf.getvalue()


def draw_trials(rows: Sequence[TrialRow], out_png: str | Path, title: str) -> Path:
    """trials.png: best val mAP per trial (pruned trials at their last epoch, the best so far as a
    step line) and val mAP per epoch of every trial (pruned ones grey), in report.py's style."""
    from matplotlib.figure import Figure

    from aicoss_cli.checkpoint import atomic_path
    from aicoss_cli.report import DPI, PNG_KEY

    fig = Figure(figsize=(13, 4.8), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    shown = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    for state, style in (("complete", {"marker": "o", "color": "C0", "label": "complete"}),
                         ("pruned", {"marker": "x", "color": "0.55", "label": "pruned (last epoch)"})):
        pts = [r for r in shown if r.state == state]
        if pts:
            left.scatter([r.number for r in pts], [r.value for r in pts], s=36, zorder=3, **style)
    complete = sorted((r for r in shown if r.state == "complete"), key=lambda r: r.number)
    if complete:
        xs, ys, best = [], [], -math.inf
        for r in complete:
            best = max(best, r.value)
            xs.append(r.number)
            ys.append(best)
        left.step(xs, ys, where="post", color="C2", label="best so far")
        top = max(complete, key=lambda r: (r.value, -r.number))
        left.scatter([top.number], [top.value], marker="*", s=220, color="C3", zorder=4,
                     label=f"best: trial {top.number}")
    for r in shown:
        if r.baseline:
            left.annotate("recipe", (r.number, r.value), textcoords="offset points", xytext=(6, -12), fontsize="small")
    left.set_title("val mAP per trial")
    left.set_xlabel("trial")
    left.set_ylabel("val mAP")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.grid(alpha=0.3)
    if shown:
        left.legend(fontsize="small", loc="best")
    for r in rows:
        if not r.curve:
            continue
        epochs = list(range(1, len(r.curve) + 1))
        if r.state == "complete":
            right.plot(epochs, r.curve, marker="o", markersize=3, color=COLOURS[r.number % len(COLOURS)],
                       label=f"trial {r.number}")
        else:
            right.plot(epochs, r.curve, marker="x", markersize=4, color="0.6", linestyle="--")
    right.set_title("val mAP per epoch (grey: pruned or stopped)")
    right.set_xlabel("epoch")
    right.set_ylabel("val mAP")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.grid(alpha=0.3)
    if sum(r.state == "complete" and bool(r.curve) for r in rows) <= 10:
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize="small", loc="best")
    fig.suptitle(f"aicoss tune: {title}".replace("$", r"\$"))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={PNG_KEY: "1"})
    return out_png


# --------------------------------------------------------------------------- small helpers


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return json.dumps(value) if not value or any(ch in value for ch in " ,\"'") else value
    return str(value)


def _one_line(text: str) -> str:
    """For a TOML comment: a line break in a path would end the comment."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _got(err: dict[str, Any]) -> str:
    return f" (got {_show(err.get('input'))})" if "input" in err and not isinstance(err.get("input"), dict) else ""


def _close(word: str, names: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(names), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
