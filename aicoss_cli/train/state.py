"""The resumable training state (`train_state.safetensors`) and `--resume`: what to continue, where.

The state holds the model, the optimizer, the grad scaler, the RNG states of every process and a
`TrainProgress` (the position in the run), in one safetensors file: tensors as tensors, the rest
as JSON in its metadata. Nothing is unpickled. `resolve_resume` is called once, by the CLI, and
decides the recipe, the data root and the run folder of a resumed run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path, read_safetensors, write_safetensors
from aicoss_cli.recipe import Recipe, load_recipe, recipe_diff, recipe_from_toml, resolve_recipe
from aicoss_cli.results.layout import RECIPE_FILE, RUN_FILES, STATE_FILE, SUBMISSION_FILE

STATE_FORMAT = "aicoss-train-state/1"


@dataclass
class StepBoundary:
    """The running sums of an epoch at a step boundary (device values copied on the device), to go
    back to when a step cannot be completed."""

    loss_sum: torch.Tensor
    loss_count: int
    prior_sums: torch.Tensor | None
    rng: dict[str, Any]
    seconds: float


@dataclass
class TrainProgress:
    """Where a run stands: the epoch in progress (0-based) and the optimizer steps done in it, the
    rows of metrics.csv so far, the best epoch, and the running sums of the epoch in progress."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best_map: float = -1.0
    best_epoch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0  # per-image losses summed over the micro-batches done this epoch
    loss_count: int = 0  # micro-batches done this epoch
    seconds: float = 0.0  # training seconds spent on this epoch
    prior: list[float] | None = None  # the class prior in use (P-ASL)
    prior_sums: list[float] | None = None  # the epoch's sums of predictions (prior = "predictions"), and the count
    split: dict[str, Any] = field(default_factory=dict)  # the split record of the data the run trains on
    train_seconds: float = 0.0  # training-loop seconds of the finished epochs (validation not included)
    train_images: int = 0  # images trained on in the finished epochs, all processes
    stopped_early: bool = False  # the run ended before its last epoch (early stopping, a tuner): it is done

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def at_boundary(self, step: int, boundary: StepBoundary) -> None:
        """Record the epoch's position and running sums as of a step boundary (a host sync)."""
        self.step, self.loss_sum, self.loss_count = step, float(boundary.loss_sum), boundary.loss_count
        self.seconds = boundary.seconds
        self.prior_sums = boundary.prior_sums.tolist() if boundary.prior_sums is not None else None

    @classmethod
    def from_json(cls, text: str, source: str) -> TrainProgress:
        """Rebuild from the state file, checking every field: the file is outside input."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            unknown = set(raw) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
            progress = cls(**raw)
            for name in ("epoch", "step", "global_step", "best_epoch", "loss_count", "train_images"):
                value = getattr(progress, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name} must be an integer ≥ 0 (got {value!r})")
            for name in ("best_map", "loss_sum", "seconds", "train_seconds"):
                value = getattr(progress, name)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                    raise ValueError(f"{name} must be a number (got {value!r})")
            if not isinstance(progress.rows, list) or not all(isinstance(r, dict) for r in progress.rows):
                raise ValueError("rows must be a list of tables")
            for name in ("prior", "prior_sums"):
                value = getattr(progress, name)
                if value is not None and not (isinstance(value, list) and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                    raise ValueError(f"{name} must be a list of numbers")
            if not isinstance(progress.stopped_early, bool):
                raise ValueError(f"stopped_early must be true or false (got {progress.stopped_early!r})")
            if not isinstance(progress.split, dict):
                raise ValueError("split must be a table")
        except (ValueError, TypeError) as exc:
            raise UserError(f"{source}: the training state is damaged (progress: {exc}); "
                            "start a new run, or resume from a copy of the run folder") from None
        return progress


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: torch (CPU and the current CUDA device), numpy, python."""
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- the state file


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


@dataclass
class TrainState:
    """A loaded `train_state.safetensors`."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None
    rng: list[dict[str, Any]]  # one per process of the run that saved it
    progress: TrainProgress
    recipe_toml: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors, e.g. an EMA's weights


def save_train_state(path: Path, *, model: dict[str, torch.Tensor], optimizer: dict, scaler: dict | None,
                     rng: list[dict], progress: TrainProgress, recipe_toml: str,
                     extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the state atomically (a crash leaves the previous state file intact)."""
    tensors = {f"model.{k}": v for k, v in model.items()}
    optim_tensors, optim_info = _flatten_optimizer(optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    python_rng = []
    for rank, state in enumerate(rng):
        tensors[f"rng.{rank}.torch"] = state["torch"]
        tensors[f"rng.{rank}.numpy"] = state["numpy_keys"]
        if "cuda" in state:
            tensors[f"rng.{rank}.cuda"] = state["cuda"]
        python_rng.append({"numpy_rest": state["numpy_rest"], "python": state["python"]})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": STATE_FORMAT,
        "recipe": recipe_toml,
        "progress": progress.to_json(),
        "optimizer": json.dumps(optim_info),
        "scaler": json.dumps(scaler),
        "rng": json.dumps(python_rng),
    }
    write_safetensors(path, tensors, meta)


def load_train_state(run_dir: Path) -> TrainState:
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.is_dir() or not (run_dir / RECIPE_FILE).is_file() or not path.is_file():
        raise UserError(
            f"{run_dir}: not an aicoss run folder (it needs recipe.toml and {STATE_FILE}); "
            "--resume takes a folder written by `aicoss train`, e.g. runs/<name>/<timestamp>"
        )
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an aicoss training state")
    try:
        rng_extra = json.loads(meta["rng"])
        ranks = []
        for rank, extra in enumerate(rng_extra):
            state = {"torch": tensors[f"rng.{rank}.torch"], "numpy_keys": tensors[f"rng.{rank}.numpy"], **extra}
            if f"rng.{rank}.cuda" in tensors:
                state["cuda"] = tensors[f"rng.{rank}.cuda"]
            ranks.append(state)
        optimizer = _unflatten_optimizer(tensors, json.loads(meta["optimizer"]))
        scaler = json.loads(meta["scaler"])
        recipe_toml = meta["recipe"]
        progress_text = meta["progress"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: the training state is damaged ({type(exc).__name__}: {exc}); "
                        "start a new run, or resume from a copy of the run folder") from None
    return TrainState(
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer=optimizer,
        scaler=scaler,
        rng=ranks,
        progress=TrainProgress.from_json(progress_text, str(path)),
        recipe_toml=recipe_toml,
        extra={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
    )


def restore(state: TrainState, model, optimizer, scaler, ema, info, notes: list[str]) -> TrainProgress:
    """Put a loaded state back into a freshly built model, optimizer, scaler and EMA, and this
    process's RNGs; its progress is returned."""
    model.load_state_dict(state.model)
    if ema is not None:
        saved = {k[len("ema."):]: v for k, v in state.extra.items() if k.startswith("ema.")}
        if saved:
            ema.module.load_state_dict(saved)
        else:
            ema.set(model)
            notes.append("the saved state holds no EMA (it was switched on when resuming): the EMA starts from "
                         "the current weights")
    optimizer.load_state_dict(state.optimizer)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    if len(state.rng) != info.world:
        notes.append(f"resuming on {info.world} processes, saved on {len(state.rng)}: the data order is the same, "
                     "random augmentation and dropout are not bit-identical")
    set_rng_state(state.rng[min(info.rank, len(state.rng) - 1)])
    return state.progress


# --------------------------------------------------------------------------- --resume


@dataclass
class Resume:
    """What `aicoss train --resume RUN_DIR` continues: the state, the recipe to train with, and the
    folder it writes to (RUN_DIR itself, or a new folder when --out is given)."""

    source: Path
    state: TrainState
    recipe: Recipe
    notes: list[str] = field(default_factory=list)
    out: Path | None = None  # a fork: continue into a new run folder under this one

    @property
    def complete(self) -> bool:
        """Every epoch done and the submission written: nothing is left to do."""
        p = self.state.progress
        return (self.out is None and (p.stopped_early or p.epoch >= self.recipe.optim.epochs)
                and (self.source / SUBMISSION_FILE).is_file())


def resolve_resume(run_dir: Path, recipe_path: Path | None = None, overrides: list[str] | None = None,
                   data: Path | None = None, out: Path | None = None, force: bool = False) -> Resume:
    """Load the run's state and decide the recipe: the stored one, or the given one (a recipe file
    and/or --set overrides) if it trains the same way — else an error unless `force`. `data`
    replaces the data root (a moved data folder is not a changed recipe; the Trainer checks that the
    data gives the same split). `out` continues into a new run folder under it, leaving RUN_DIR as is."""
    run_dir = Path(run_dir)
    state = load_train_state(run_dir)
    stored = recipe_from_toml(state.recipe_toml, f"{run_dir / STATE_FILE}")
    root = str(data) if data is not None else stored.data.root
    notes: list[str] = []
    recipe = stored.model_copy(deep=True)
    if recipe_path is not None or overrides:
        given = resolve_recipe(load_recipe(recipe_path or run_dir / RECIPE_FILE, overrides or []), data_root=root)
        plain = stored.model_copy(deep=True)
        plain.data.root = root  # where the data lives and where the run is logged do not change the training
        plain.runtime.loggers = list(given.runtime.loggers)
        changes = recipe_diff(plain, given)
        if changes and not force:
            shown = "; ".join(changes[:4]) + (f" (and {len(changes) - 4} more)" if len(changes) > 4 else "")
            raise UserError(f"{run_dir}: the recipe changed since this run started ({shown}); "
                            "resume without a recipe, or add --force")
        if changes:
            notes.append("resuming with a changed recipe (--force): " + "; ".join(changes))
            state.progress.stopped_early = False  # the changed recipe decides again when to stop
        recipe = given
    recipe.data.root = root
    if data is not None and str(data) != stored.data.root:
        notes.append(f"data root {stored.data.root} → {data}")
    return Resume(run_dir, state, recipe, notes, Path(out) if out is not None else None)


def fork_run(source: Path, target: Path) -> None:
    """Copy what a run has written so far into a new run folder (the source is left untouched)."""
    for name in RUN_FILES:
        if (source / name).is_file():
            with atomic_path(target / name) as tmp:
                shutil.copyfile(source / name, tmp)
