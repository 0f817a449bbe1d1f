"""What `aicoss tune` searches and how every trial's recipe is made from it.

A search space is a list of `Param`s, one per recipe key (`optim.lr`, `augment.policy`...): a
range (`low`, `high`, optionally `log` or `step`; integer or float by the key's type) or a list of
`choices`, optionally sampled only `when` an earlier categorical parameter has given values.
`load_space` reads one from TOML and checks it against the recipe schema before any trial runs;
`default_space` builds the default one from the recipe and its data. `TrialRecipes` sets a
trial's values on the recipe exactly as `aicoss train RECIPE --set key=value` would.

No Optuna here: a space is checked before the study starts.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aicoss_cli.base.errors import UserError
from aicoss_cli.recipe import OPTIONAL_SECTIONS, SECTIONS, Recipe, read_toml, resolve_recipe, validate_recipe

# keys a search may not change: they name the run or define the val split every trial is scored on

FIXED_KEYS = {"name": "it names the runs", "description": "it describes the recipe",
              "optim.epochs": "use --epochs"}
FIXED_SECTIONS = {"data": "it defines the val split every trial is scored on"}
NOT_SEARCHED = "the teachers and the distillation weight stay as the recipe sets them"  # OPTIONAL_SECTIONS


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
            return "one of " + ", ".join(show_value(c) for c in self.choices)
        what = ("log-uniform" if self.log else "uniform") if self.kind == "float" else (
            "integer, log" if self.log else "integer")
        step = f", step {show_value(self.step)}" if self.step else ""
        return f"{what} {show_value(self.low)} … {show_value(self.high)}{step}"

    def describe_when(self) -> str:
        return "; ".join(f"{key} in {{{', '.join(show_value(v) for v in allowed)}}}" for key, allowed in self.when)

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
        raise UserError(f"{src}: extends must be \"default\" (got {show_value(extends)}); leave it out to search only "
                        "the entries in this file")
    settings = _settings(src, raw.pop("tune", {}))
    entries: dict[str, Any] = {}
    for section, table in raw.items():
        if section in OPTIONAL_SECTIONS:
            raise UserError(f"{src}: [{section}] cannot be searched ({NOT_SEARCHED})")
        if section not in SECTIONS:
            if section in FIXED_KEYS:
                _check_key(src, section)
            raise UserError(f"{src}: unknown section [{section}]; entries look like [optim.lr] with a recipe section "
                            f"({', '.join(SECTIONS)}), and [tune] holds the sampler and pruner"
                            f"{_close(section, [*SECTIONS, 'tune'])}")
        if not isinstance(table, dict):
            raise UserError(f"{src}: {section} = {show_value(table)}: entries are tables such as [{section}.<key>]")
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
        raise UserError(f"{where} must be a table with low and high, or choices (got {show_value(entry)}), e.g. "
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
            raise UserError(f"{where} choices holds {show_value(bad[0])}; give finite numbers")
        if len({json.dumps(c) for c in e.choices}) < len(e.choices):
            raise UserError(f"{where} choices lists a value twice ({', '.join(show_value(c) for c in e.choices)})")
        return Param(key, "categorical", choices=tuple(e.choices), when=when)
    if e.low is None or e.high is None:
        missing = "low" if e.low is None else "high"
        raise UserError(f"{where} has no {missing}; a range needs low and high (or give choices = [...])")
    if kind is None:
        raise UserError(f"{where} is not a number, so it has no range; list the values: choices = [...]")
    for name, value in (("low", e.low), ("high", e.high), ("step", e.step)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{where} {name} = {show_value(value)}; give a finite number")
        if kind == "int" and value is not None and not isinstance(value, int):
            raise UserError(f"{where} {name} = {show_value(value)}: {key} is an integer; give integers (or choices)")
    if not e.low < e.high:
        raise UserError(f"{where} is an empty range: low ({show_value(e.low)}) must be below high ({show_value(e.high)}); "
                        "to fix one value, set it in the recipe instead")
    if e.log and e.low <= 0:
        raise UserError(f"{where} log = true needs low > 0 (got {show_value(e.low)})")
    if e.log and e.step is not None:
        raise UserError(f"{where} has both log and step; Optuna takes one of them")
    if e.step is not None and not 0 < e.step <= e.high - e.low:
        raise UserError(f"{where} step must be > 0 and at most high - low (got {show_value(e.step)})")
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
    the first value its condition allows) gives a recipe the schema accepts and the data and the
    arch take (`train.prepare.check_fits`: batch size vs training rows, input size, prior file)."""
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
                raise UserError(f"{where} {key} in {{{', '.join(show_value(v) for v in allowed)}}}: none of these is one "
                                f"of its choices ({', '.join(show_value(c) for c in cond.choices)})")
    from aicoss_cli.train.prepare import check_fits

    data = recipes.inspect_data()
    for p in space.params:
        context = {key: next(v for v in allowed if v in by_key[key].choices) for key, allowed in p.when}
        probes = p.choices if p.kind == "categorical" else (p.low, p.high)
        for value in probes:
            label = "choice" if p.kind == "categorical" else ("low" if value == p.low else "high")
            where = f"{space.source}: [{p.key}] {label} {show_value(value)}"
            recipe = recipes.build({**context, p.key: value}, source=where)
            try:  # what the data or the arch refuses for this value, before trial 0 rather than in a trial
                check_fits(recipe, len(data.train_rows), data.table.classes)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- trial recipes


class TrialRecipes:
    """The recipe of every trial: the RECIPE file (or the name of a bundled recipe, as `train`
    takes it) with `--epochs` and `--data`, and the values a trial drew set on it exactly as
    `aicoss train RECIPE --set key=value` would."""

    def __init__(self, path: str | Path, data: str | Path | None = None, epochs: int | None = None):
        from aicoss_cli.recipe import check_recipe_names, find_recipe

        self.path, self.data = find_recipe(Path(path)), data
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
        self._prepared = None

    def inspect_data(self, progress=None):
        """The data, checked once (CSVs, labels, split, every image) on the first call, before any
        trial; later calls return the same `PreparedData`."""
        if self._prepared is None:
            from aicoss_cli.train.prepare import prepare_data

            self._prepared = prepare_data(self.base, progress)
        return self._prepared

    @property
    def partial_labels(self) -> bool:
        """Whether train.csv has unannotated (-1) labels (the default space then searches the loss)."""
        return bool((self.inspect_data().table.labels < 0).any())

    def build(self, values: dict[str, Value], source: str, name: str | None = None) -> Recipe:
        """The base recipe with `values` (recipe keys → values) set, validated and resolved; a loss
        changed by `values` drops the recipe's parameters of the other loss."""
        from aicoss_cli.losses.registry import loss_param_defaults, resolve_loss_name
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




# --------------------------------------------------------------------------- small helpers


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return json.dumps(value) if not value or any(ch in value for ch in " ,\"'") else value
    return str(value)


def _got(err: dict[str, Any]) -> str:
    return f" (got {show_value(err.get('input'))})" if "input" in err and not isinstance(err.get("input"), dict) else ""


def _close(word: str, names: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(names), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
