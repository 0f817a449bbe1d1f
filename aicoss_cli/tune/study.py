"""Hyper-parameter search over a recipe with Optuna: what `aicoss tune` runs.

    from aicoss_cli.tune import TrialRecipes, load_space, tune
    recipes = TrialRecipes("recipes/starter.toml", data="data/own", epochs=3)
    space = load_space(None, recipes)            # the default space; or a space TOML file
    result = tune(recipes, space, trials=20, out="runs/tune", storage=None, study_name=None)

The search space and every trial's recipe are `space`'s.

Every trial is a normal `aicoss train` run folder under `<out>/<study>/`, trained by the public
`Trainer`; a callback reports each epoch's val mAP to Optuna and ends the run when the median
pruner says so. The study lives in an Optuna storage (SQLite by default), so running the same
command again continues it; trials the study holds are never run again. At the end: a table of
the trials (`trials.csv`), the best recipe (`best.toml`) and a picture (`trials.png`).

Optuna is imported inside the functions that need it (the `tune` extra); a missing extra is a
one-line error naming the pip command. This module imports the Trainer (and so torch): the CLI
imports it inside the command.
"""

from __future__ import annotations

import csv
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
from typing import Any

from rich.markup import escape

from aicoss_cli.base.errors import TrainingStopped, UserError
from aicoss_cli.base.files import check_writable_folder, process_alive, write_text_atomic
from aicoss_cli.recipe import Recipe, recipe_to_toml
from aicoss_cli.train.trainer import Callback, Trainer
from aicoss_cli.tune.space import Space, TrialRecipes, TuneSettings, Value, show_value

INSTALL = "pip install 'aicoss[tune]'"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
BEST_FILE, TRIALS_FILE, PICTURE_FILE, DB_FILE = "best.toml", "trials.csv", "trials.png", "tune.db"
BEST_HEADER = "# aicoss tune:"
TRIALS_HEADER = ("trial", "state", "val_map", "epochs", "seconds", "params", "run_dir", "note")
DEAD_NOTE = "its process ended before the trial did (killed or crashed)"
STUDY_ATTR = "aicoss"  # the study's user attribute holding what it was started with


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"aicoss tune needs Optuna: {INSTALL}") from None
    return optuna


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
        folder = Path(url[len("sqlite:///"):]).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--storage {url}: its folder {folder} cannot be made ({exc.strerror or exc}); give a "
                            "database URL in a folder you can write, such as sqlite:///runs/tune.db") from None
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
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or process_alive(pid):
            continue
        storage.set_trial_user_attr(t._trial_id, "note", DEAD_NOTE)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        dead.append(t.number)
    return dead


class _ReportToOptuna(Callback):
    """Trainer callback: each epoch's val mAP to the trial; ends the run when the pruner says so
    (never at the last epoch, when there is nothing left to save)."""

    def __init__(self, trial, epochs: int):
        self.trial, self.epochs, self.pruned_at, self.last = trial, epochs, None, math.nan

    def on_run_start(self, trainer) -> None:
        self.trial.set_user_attr("run_dir", str(trainer.run_dir))

    def on_epoch_end(self, trainer, row) -> bool:
        from aicoss_cli.train import keep

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
         say: Callable[[str], None] | None = None) -> TuneResult:
    """Run trials until the study holds `trials` finished (complete or pruned) ones, or `timeout`
    seconds have passed (no trial starts after that); the data is checked first (once per
    `recipes`) and its split recorded in the study; write trials.csv, best.toml and trials.png
    into <out>/<study>/, whenever and however the study stops. A trial the data refuses is failed
    with its reason and the study goes on; Ctrl-C stops the running trial (TrainingStopped, exit
    code 130); the same call continues the study."""
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
    setup = study_setup(recipes, space, recipes.inspect_data().split)
    study = optuna.create_study(study_name=name, storage=db, direction="maximize", load_if_exists=True,
                                sampler=_sampler(optuna, space.settings), pruner=_pruner(optuna, space))
    old = study.user_attrs.get(STUDY_ATTR)
    if old is None:
        study.set_user_attr(STUDY_ATTR, setup)
    elif old != setup:
        raise UserError(f"study {name!r} in {url} was started with another "
                        f"{' and '.join(_setup_changes(old, setup))}; run it with the settings it started with, or "
                        "start a new one with --study NAME")
    study.sampler = _sampler(optuna, space.settings, len(study.get_trials(deepcopy=False)))
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
    stopped: BaseException | None = None
    try:
        for _ in range(max(trials - finished, 0)):
            if timeout is not None and time.monotonic() - started >= timeout:
                notes.append(f"--timeout {timeout:g} s reached: no further trial started")
                break
            if len(study.get_trials(deepcopy=False, states=done_states)) >= trials:
                break  # other machines finished the study
            ran += 1
            _run_trial(optuna, study, recipes, space, study_dir, console, say)
    except KeyboardInterrupt:  # between two trials
        stopped = TrainingStopped("interrupted", exit_code=130)
    except BaseException as exc:  # Ctrl-C in a trial, a full disk, a bug: the trials so far are summarised first
        stopped = exc
    rows = trial_rows(study)
    result = TuneResult(name, url, study_dir, rows, _best(rows), notes=notes, ran=ran)
    if rows:
        try:
            result.files = write_outputs(result, recipes, space)
        except (OSError, UserError):
            if stopped is None:
                raise  # else the stop says more (a full disk refuses the summaries too)
    if isinstance(stopped, TrainingStopped) and stopped.exit_code == 130:
        finished = sum(r.state in ("complete", "pruned", "diverged") for r in rows)
        raise TrainingStopped(f"interrupted; the study keeps its {finished} finished trial{'' if finished == 1 else 's'}"
                              ": run the same command to go on", exit_code=130)
    if stopped is not None:
        raise stopped
    return result


def _sampler(optuna, settings: TuneSettings, done: int = 0):
    """The sampler of a session that starts with `done` trials in the study. Seeded, its seed is
    `[tune] seed` for a new study and a new one drawn from (seed, done) for each later session: a
    resumed study must not draw again the values its first session drew."""
    seed = settings.seed
    if seed is not None and done:
        import numpy as np

        seed = int(np.random.SeedSequence([seed, done]).generate_state(1)[0])
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


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
    shown = "  ".join(f"{k}={show_value(v)}" for k, v in values.items())
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
    except UserError as exc:  # the data refuses these values (a check of the trial's recipe): the study goes on
        return _Outcome("FAIL", note=str(exc), message=f"[red]failed[/]: {escape(str(exc))}")
    except TrainingStopped as exc:
        # a non-finite loss: these values diverged, a bad outcome rather than a broken study; any other
        # stop (Ctrl-C, an unreadable image, a full disk) stops the study
        if not exc.diverged:
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
    from aicoss_cli.results.pictures import is_report_picture

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
                  f"#   aicoss train {_comment_safe(str(result.study_dir / BEST_FILE))}"]
        files["best"] = result.study_dir / BEST_FILE
        write_text_atomic(files["best"], "\n".join(header) + "\n" + recipe_to_toml(recipe))
    try:
        from aicoss_cli.results.pictures import draw_trials

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


def _comment_safe(text: str) -> str:
    """For a TOML comment: a line break in a path would end the comment."""
    return text.replace("\r", "\\r").replace("\n", "\\n")
