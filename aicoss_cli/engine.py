"""The one training loop for every recipe: device, precision, DDP, accumulation, checkpoints, resume.

Set-up lives in small functions beside the loop (`select_device`, `select_precision`,
`prepare_data`, ...). The loop prints nothing but its progress.

Exactness: an epoch's order is a seeded permutation, each image is augmented under its own
seed (`data.sample_seed`), and the resumable state holds the model, optimizer, grad scaler,
every RNG and the position in the epoch — so on the CPU with `runtime.deterministic = true`
a run killed at any step and resumed ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from aicoss_cli import distributed
from aicoss_cli.console import LogLines, clock, progress_display
from aicoss_cli.checkpoint import CheckpointMeta, atomic_path, read_safetensors, save_checkpoint, write_text_atomic
from aicoss_cli.data import (
    ImageDataset,
    LabeledTable,
    TestTable,
    TrainBatches,
    build_train_transform,
    check_images,
    eval_batches,
    make_loader,
    micro_batch_size,
    normalize,
    read_test,
    read_train,
    shard,
    split_fingerprint,
    split_indices,
)
from aicoss_cli.errors import TrainingStopped, UserError
from aicoss_cli.inference import autocast, inference_device, precision_dtype, predict_logits, write_scores_csv
from aicoss_cli.metrics import mean_average_precision, skipped_classes
from aicoss_cli.recipe import Recipe, recipe_diff, recipe_from_toml, recipe_to_toml

STATE_FILE = "train_state.safetensors"
STATE_FORMAT = "aicoss-train-state/1"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_map", "seconds")


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    best_epoch: int
    best_map: float
    skipped_classes: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- set-up


def select_device(spec: str, info: distributed.DistInfo | None = None) -> torch.device:
    """The recipe's `[runtime] device`; under torchrun, "cuda" means this process's local GPU."""
    device = inference_device(spec, where="[runtime] device")
    if device.type == "cuda" and device.index is None and info is not None and info.active:
        return torch.device("cuda", info.local_rank)
    return device


def select_precision(precision: str, device: torch.device, notes: list[str]) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler): fp16 (CUDA only) trains with a grad scaler."""
    dtype = precision_dtype(precision, device, notes)
    return dtype, dtype is torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(optim, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up per step over `warmup_epochs`, then cosine annealing from lr to min_lr,
    stepped per epoch as the seed's CosineAnnealingLR(T_max=epochs) was:
    lr_e = min_lr + (lr − min_lr)·(1 + cos(π·e/E))/2, e counted from the end of the warm-up."""
    if epoch < optim.warmup_epochs:
        done = epoch * steps_per_epoch + step + 1
        return optim.lr * done / (optim.warmup_epochs * steps_per_epoch)
    e, total = epoch - optim.warmup_epochs, optim.epochs - optim.warmup_epochs
    return optim.min_lr + (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * e / total)) / 2


@dataclass
class PreparedData:
    table: LabeledTable
    test: TestTable
    train_rows: np.ndarray
    val_rows: np.ndarray
    split: dict[str, Any]


def prepare_data(recipe: Recipe, progress=None) -> PreparedData:
    """Read and check every input before any compute: CSVs, labels, split, every image file."""
    table = read_train(recipe.data.root)
    test = read_test(recipe.data.root, table.classes)
    if len(test) == 0:
        raise UserError(f"{test.root / 'test.csv'}: no test images")
    for paths, csv in ((table.paths, table.root / "train.csv"), (test.paths, test.root / "test.csv")):
        task = progress.add_task(f"checking {csv.name} images", total=len(paths)) if progress else None
        check_images(paths, csv, (lambda n, t=task: progress.advance(t, n)) if progress else None)
        if progress:
            progress.remove_task(task)
    train_rows, val_rows = split_indices(table.labels, recipe.data.split, recipe.data.val_fraction, recipe.data.split_seed)
    split = {
        "kind": recipe.data.split,
        "val_fraction": recipe.data.val_fraction,
        "split_seed": recipe.data.split_seed,
        "n_rows": len(table),
        "n_val": int(len(val_rows)),
        "val_fingerprint": split_fingerprint(table.ids, val_rows),
    }
    return PreparedData(table, test, train_rows, val_rows, split)


def new_run_dir(out: Path, name: str) -> Path:
    """OUT/<name>/<UTC timestamp>/, never an existing folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out) / name
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{base}: could not create a new run folder")


# --------------------------------------------------------------------------- resumable state


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


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_train_state(path: Path, model, optimizer, scaler, rng_states: list[dict], progress: dict, recipe_toml: str) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_info = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    python_rng = []
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}.torch"] = rng["torch"]
        tensors[f"rng.{rank}.numpy"] = rng["numpy_keys"]
        if "cuda" in rng:
            tensors[f"rng.{rank}.cuda"] = rng["cuda"]
        python_rng.append({"numpy_rest": rng["numpy_rest"], "python": rng["python"]})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": STATE_FORMAT,
        "recipe": recipe_toml,
        "progress": json.dumps(progress),
        "optimizer": json.dumps(optim_info),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else None),
        "rng": json.dumps(python_rng),
    }
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_train_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    if not Path(run_dir).is_dir() or not (Path(run_dir) / "recipe.toml").is_file() or not path.is_file():
        raise UserError(
            f"{run_dir}: not an aicoss run folder (it needs recipe.toml and {STATE_FILE}); "
            "--resume takes a folder written by `aicoss train`, e.g. runs/<name>/<timestamp>"
        )
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an aicoss training state")
    rng = json.loads(meta["rng"])
    ranks = []
    for rank, extra in enumerate(rng):
        state = {"torch": tensors[f"rng.{rank}.torch"], "numpy_keys": tensors[f"rng.{rank}.numpy"], **extra}
        if f"rng.{rank}.cuda" in tensors:
            state["cuda"] = tensors[f"rng.{rank}.cuda"]
        ranks.append(state)
    return {
        "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        "optimizer": _unflatten_optimizer(tensors, json.loads(meta["optimizer"])),
        "scaler": json.loads(meta["scaler"]),
        "rng": ranks,
        "progress": json.loads(meta["progress"]),
        "recipe_toml": meta["recipe"],
    }


def check_resume_recipe(run_dir: Path, stored_toml: str, recipe: Recipe | None, force: bool, notes: list[str]) -> Recipe:
    """The recipe to continue with: the stored one, or the given one if it is the same (or --force)."""
    stored = recipe_from_toml(stored_toml, f"{run_dir}/{STATE_FILE}")
    if recipe is None:
        return stored
    changes = recipe_diff(stored, recipe)
    if changes and not force:
        shown = "; ".join(changes[:4]) + (f" (and {len(changes) - 4} more)" if len(changes) > 4 else "")
        raise UserError(f"{run_dir}: the recipe changed since this run started ({shown}); resume without a recipe, or add --force")
    if changes:
        notes.append("resuming with a changed recipe (--force): " + "; ".join(changes))
    return recipe


# --------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary; a second Ctrl-C is immediate."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _ignore_sigint(_worker_id: int) -> None:
    # loader workers must survive Ctrl-C so the main process can save a clean checkpoint
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train(recipe: Recipe, out: Path, *, resume: Path | None = None, force: bool = False,
          console=None, resume_recipe_given: bool = True) -> RunResult:
    """Train `recipe` (already resolved) into a new run folder under `out`, or continue `resume`."""
    use_cuda = recipe.runtime.device != "cpu" and torch.cuda.is_available()
    info = distributed.setup(use_cuda)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _Trainer(recipe, out, resume, force, console, info, resume_recipe_given).run()
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # a process-wide switch
        distributed.teardown(info)


class _Trainer:
    def __init__(self, recipe, out, resume, force, console, info, resume_recipe_given):
        self.info = info
        self.notes: list[str] = []
        self.console = console
        self.state = None
        if resume is not None:
            self.state = load_train_state(resume)
            recipe = check_resume_recipe(resume, self.state["recipe_toml"], recipe if resume_recipe_given else None,
                                         force, self.notes)
        self.recipe = recipe
        self.out, self.resume = Path(out), resume

    # -- helpers
    @property
    def _terminal(self) -> bool:
        """A live bar for a terminal; elsewhere (a log file) the bar would only print its last state,
        so `LogLines` writes plain lines instead."""
        return self.console is not None and self.console.is_terminal

    def _progress(self):
        return progress_display(self.console, enabled=self.info.main and self._terminal)

    def _say(self, text: str) -> None:
        if self.info.main and self.console is not None:
            self.console.print(text)

    def run(self) -> RunResult:
        r, info = self.recipe, self.info
        self._setup()
        for note in self.notes:
            self._say(f"[yellow]note:[/] {escape(note)}")
        self._say(f"run folder: {escape(str(self.run_dir))}")
        ps = self.progress_state
        start_epoch, start_step = ps["epoch"], ps["step"]
        with _StopFlag() as stop, self._progress() as progress:
            for epoch in range(start_epoch, r.optim.epochs):
                resumed = epoch == start_epoch and ps["running"] is not None
                running = ps["running"] if resumed else {"loss_sum": 0.0, "loss_count": 0, "seconds": 0.0}
                prior_acc = None
                if self.prior_mode == "predictions":
                    saved = ps.get("prior_sums") if resumed else None
                    prior_acc = torch.tensor(saved if saved else [0.0] * (len(self.classes) + 1), dtype=torch.float64)
                self._train_epoch(epoch, start_step if epoch == start_epoch else 0, running, prior_acc, stop, progress)
                self._end_epoch(epoch, running, prior_acc, progress)
        if info.main:
            self._write_submission()
        distributed.barrier(info)
        skipped = skipped_classes(self.val_targets.numpy())
        if skipped:
            self.notes.append(f"{skipped} of {len(self.classes)} classes have no positive in the val split; "
                              "val mAP averages the others")
        return RunResult(run_dir=self.run_dir, rows=ps["rows"], best_epoch=ps["best_epoch"],
                         best_map=ps["best_map"], skipped_classes=skipped, notes=self.notes)

    def _setup(self) -> None:
        r, info = self.recipe, self.info
        self.device = device = select_device(r.runtime.device, info)
        self.amp_dtype, use_scaler = select_precision(r.runtime.precision, device, self.notes)
        if r.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.channels_last = r.runtime.channels_last is True or (r.runtime.channels_last == "auto" and device.type == "cuda")
        self.micro_batch = micro_batch_size(r.optim.batch_size, r.optim.grad_accumulation, info.world)
        with progress_display(self.console, enabled=info.main, transient=True) as progress:
            self.data = data = prepare_data(r, progress if info.main else None)
        if len(data.train_rows) < r.optim.batch_size:
            raise UserError(
                f"[optim] batch_size {r.optim.batch_size} is larger than the training split "
                f"({len(data.train_rows)} images); lower it with --set optim.batch_size=N"
            )
        self.classes = data.table.classes

        from aicoss_cli.losses import build_loss
        from aicoss_cli.models import build_model

        seed_everything(r.runtime.seed)
        pretrained = r.model.pretrained if self.state is None else False  # resumed weights replace them anyway
        model = build_model(r.model.arch, len(self.classes), pretrained=pretrained, img_size=r.model.img_size)
        self.loss_fn = build_loss(r.loss.name, **r.loss.params())
        self.prior_mode, self.prior = self._initial_prior(data)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=r.optim.lr, weight_decay=r.optim.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        self.progress_state = {"epoch": 0, "step": 0, "global_step": 0, "best_map": -1.0, "best_epoch": 0,
                               "rows": [], "running": None, "prior_sums": None, "prior": None}
        if self.state is not None:
            model.load_state_dict(self.state["model"])
            self.optimizer.load_state_dict(self.state["optimizer"])
            if self.scaler is not None and self.state["scaler"]:
                self.scaler.load_state_dict(self.state["scaler"])
            self.progress_state.update(self.state["progress"])
            if self.progress_state.get("prior") is not None:
                self.prior = torch.tensor(self.progress_state["prior"])
            if len(self.state["rng"]) != info.world:
                self.notes.append(f"resuming on {info.world} processes, saved on {len(self.state['rng'])}: the data "
                                  "order is the same, random augmentation and dropout are not bit-identical")
            self.run_dir = Path(self.resume)
        else:
            run_dir = new_run_dir(self.out, r.name) if info.main else None
            self.run_dir = Path(distributed.broadcast_object(info, str(run_dir) if run_dir else None))
        if info.main:
            write_text_atomic(self.run_dir / "recipe.toml", recipe_to_toml(r))
        self._apply_prior()

        self.raw_model = model
        if info.active:
            if r.runtime.sync_bn:
                model = self.raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if r.runtime.compile:
            model = torch.compile(model)
        self.model = model

        transform = build_train_transform(r.augment.policy, r.augment.magnitude, r.augment.num_ops, r.augment.cutout_factor)
        self.train_set = ImageDataset(data.table.paths, data.table.labels, r.model.img_size, transform)
        self.eval_set = ImageDataset(data.table.paths, data.table.labels, r.model.img_size)
        self.eval_bs = r.runtime.eval_batch_size or self.micro_batch
        self.pin = device.type == "cuda"
        self.val_targets = torch.from_numpy(data.table.labels[data.val_rows].astype(np.float32))
        # DDP averages gradients over ranks and accumulation sums them: scale so that one optimizer step
        # follows the gradient of the recipe's loss on the whole global batch
        self.micro_scale = info.world if self.loss_fn.reduction == "sum" else 1.0 / r.optim.grad_accumulation
        if self.state is not None:
            _set_rng_state(self.state["rng"][min(info.rank, len(self.state["rng"]) - 1)])
        else:
            seed_everything(r.runtime.seed + 1_000 * info.rank)  # same init everywhere, own dropout noise per rank
        self.boundary_rng = _rng_state()

    def _apply_prior(self) -> None:
        if self.prior is not None and hasattr(self.loss_fn, "set_prior"):
            self.loss_fn.set_prior(self.prior.to(self.device))

    def _save_state(self, epoch: int, step: int, running: dict | None, prior_acc: torch.Tensor | None) -> None:
        """Resumable state as of the last step boundary (a collective: every rank calls it)."""
        ps = self.progress_state
        ps.update(epoch=epoch, step=step, running=None if running is None else dict(running),
                  prior_sums=None if prior_acc is None else prior_acc.tolist(),
                  prior=None if self.prior is None else [float(v) for v in self.prior])
        states = distributed.all_gather_objects(self.info, self.boundary_rng)
        if self.info.main:
            save_train_state(self.run_dir / STATE_FILE, self.raw_model, self.optimizer, self.scaler, states, ps,
                             recipe_to_toml(self.recipe))

    def _any_rank(self, flag: bool) -> bool:
        if not self.info.active:
            return flag
        return bool(distributed.all_reduce_sum(self.info, torch.tensor([float(flag)], device=self.device)).item() > 0)

    def _train_epoch(self, epoch, start_step, running, prior_acc, stop, progress) -> None:
        r, info, device = self.recipe, self.info, self.device
        sampler = TrainBatches(self.data.train_rows, r.optim.batch_size, r.optim.grad_accumulation, info.rank,
                               info.world, r.runtime.seed, epoch, start_step=start_step,
                               augment=r.augment.policy != "none")
        loader = make_loader(self.train_set, sampler, r.runtime.num_workers, self.pin,
                             worker_init_fn=_ignore_sigint if r.runtime.num_workers else None)
        steps, step, micro = sampler.steps, start_step, 0
        boundary = (dict(running), None if prior_acc is None else prior_acc.clone())
        task = progress.add_task(f"epoch {epoch + 1}/{r.optim.epochs}", total=steps, completed=step, stats="")
        t0, seen = time.perf_counter(), 0
        log_lines = LogLines(steps, enabled=self.console is not None and not self._terminal)
        self.model.train()
        for images, targets, _, errors in loader:
            bad = next((e for e in errors if e), "")
            if self._any_rank(bool(bad)):
                message = next(m for m in distributed.all_gather_objects(info, bad) if m)
                running.update(boundary[0])
                self._save_state(epoch, step, running, boundary[1])
                raise TrainingStopped(
                    f"{message}. Training stopped at epoch {epoch + 1}, step {step}; fix or remove the file and "
                    f"continue with `aicoss train --resume {self.run_dir}`", exit_code=2)
            x = normalize(images.to(device, non_blocking=self.pin))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = targets.to(device, non_blocking=self.pin)
            last_micro = micro == r.optim.grad_accumulation - 1
            with (self.model.no_sync() if info.active and not last_micro else contextlib.nullcontext()):
                with autocast(device, self.amp_dtype):
                    logits = self.model(x)
                loss = self.loss_fn(logits.float(), y)
                value = float(loss.detach())
                if self._any_rank(not math.isfinite(value)):
                    raise TrainingStopped(
                        f"non-finite loss at epoch {epoch + 1}, step {step + 1} (global step "
                        f"{self.progress_state['global_step'] + 1}); the weights were not updated and the last good "
                        f"checkpoint ({self.run_dir / 'last.safetensors'}, {self.run_dir / STATE_FILE}) is kept; "
                        "lower [optim] lr or use precision = \"fp32\"")
                scaled = loss * self.micro_scale
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            running["loss_sum"] += self._per_image(value, len(images))
            running["loss_count"] += 1
            if prior_acc is not None:
                probs = torch.sigmoid(logits.detach().float()).sum(0).double().cpu()
                prior_acc[:-1] += probs
                prior_acc[-1] += len(images)
            seen += len(images)
            micro += 1
            if not last_micro:
                continue
            micro = 0
            self.lr = learning_rate(r.optim, epoch, step, steps)
            self._optimizer_step()
            step += 1
            self.progress_state["global_step"] += 1
            self.boundary_rng = _rng_state()
            elapsed = time.perf_counter() - t0
            stats = (f"loss {running['loss_sum'] / running['loss_count']:.4f}  "
                     f"{seen * info.world / max(elapsed, 1e-9):.0f} img/s")
            progress.update(task, advance=1, stats=stats)
            if log_lines.due(step, elapsed):
                eta = elapsed / (step - start_step) * (steps - step)
                self._say(f"epoch {epoch + 1}/{r.optim.epochs}  step {step}/{steps}  {stats}  "
                          f"eta {clock(eta)}")
            boundary = (dict(running, seconds=running["seconds"] + elapsed),
                        None if prior_acc is None else prior_acc.clone())
            if self._any_rank(stop.requested):
                self._save_state(epoch, step, boundary[0], boundary[1])
                raise TrainingStopped(f"interrupted at epoch {epoch + 1}, step {step}; resumable state saved: "
                                      f"continue with `aicoss train --resume {self.run_dir}`", exit_code=130)
            every = r.runtime.checkpoint_every
            if every and self.progress_state["global_step"] % every == 0 and step < steps:
                self._save_state(epoch, step, boundary[0], boundary[1])
        running["seconds"] += time.perf_counter() - t0
        progress.update(task, stats=f"loss {running['loss_sum'] / max(running['loss_count'], 1):.4f}")
        self.lr = learning_rate(r.optim, epoch, max(steps - 1, 0), steps)

    def _optimizer_step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, epoch, running, prior_acc, progress) -> None:
        """Reduce the loss over ranks, validate, write metrics and checkpoints, save resumable state."""
        info, ps, data = self.info, self.progress_state, self.data
        totals = distributed.all_reduce_sum(
            info, torch.tensor([running["loss_sum"], float(running["loss_count"])], device=self.device)).cpu()
        train_loss = float(totals[0] / max(float(totals[1]), 1.0))
        t_val = time.perf_counter()
        val_logits = self._evaluate(progress)
        used_prior = self.prior
        if prior_acc is not None:  # the seed's ComputePrior: mean prediction over this epoch's training images
            sums = distributed.all_reduce_sum(info, prior_acc.to(self.device)).cpu()
            self.prior = (sums[:-1] / max(float(sums[-1]), 1.0)).float()
            self._apply_prior()
        seconds = running["seconds"] + (time.perf_counter() - t_val)
        if info.main:
            val_probs = torch.sigmoid(val_logits)
            val_map = mean_average_precision(self.val_targets.numpy(), val_probs.numpy())
            val_loss = self._val_loss(val_logits)
            ps["rows"].append({"epoch": epoch + 1, "lr": self.lr, "train_loss": train_loss, "val_loss": val_loss,
                               "val_map": val_map, "seconds": round(seconds, 3)})
            self._write_metrics(ps["rows"])
            meta = CheckpointMeta(arch=self.recipe.model.arch, img_size=self.recipe.model.img_size,
                                  classes=self.classes, recipe_toml=recipe_to_toml(self.recipe), epoch=epoch + 1,
                                  val_map=val_map, split=data.split,
                                  prior=None if used_prior is None else used_prior.tolist())
            save_checkpoint(self.run_dir / "last.safetensors", self.raw_model.state_dict(), meta)
            best = val_map > ps["best_map"]
            if best:
                ps["best_map"], ps["best_epoch"] = val_map, epoch + 1
                save_checkpoint(self.run_dir / "best.safetensors", self.raw_model.state_dict(), meta)
                write_scores_csv(self.run_dir / "val_scores.csv", [data.table.ids[i] for i in data.val_rows],
                                 self.classes, val_probs)
            if self.prior is not None:
                from aicoss_cli.prior import write_prior_csv

                write_prior_csv(self.run_dir / "prior.csv", self.classes, self.prior.tolist())
            self._say(f"epoch {epoch + 1}/{self.recipe.optim.epochs}  train_loss {train_loss:.4f}  "
                      f"val_loss {val_loss:.4f}  val_mAP {val_map:.4f}{'  (best)' if best else ''}  {seconds:.1f}s")
        ps["rows"], ps["best_map"], ps["best_epoch"] = distributed.broadcast_object(
            info, (ps["rows"], ps["best_map"], ps["best_epoch"]))
        self._save_state(epoch + 1, 0, None, None)

    # -- pieces of the loop
    def _initial_prior(self, data: PreparedData) -> tuple[str | None, torch.Tensor | None]:
        source = self.recipe.loss.prior
        if source is False:
            return None, None
        from aicoss_cli.prior import label_prior, prior_has_effect, read_prior_csv

        why = prior_has_effect(self.recipe.loss.name, self.recipe.loss.params(), data.table.labels[data.train_rows])
        if why:
            self.notes.append(f"[loss] prior = {source!r} changes nothing here: {why}")
        if source == "labels":
            return "labels", label_prior(torch.from_numpy(data.table.labels[data.train_rows]))
        if source == "predictions":
            return "predictions", None  # no prior in the first epoch; then the previous epoch's mean prediction
        return "file", read_prior_csv(source, data.table.classes)

    def _evaluate(self, progress) -> torch.Tensor:
        """Validation logits of every rank's shard, gathered in val order (no padding duplicates)."""
        mine = shard(self.data.val_rows, self.info.rank, self.info.world)
        loader = make_loader(self.eval_set, eval_batches(mine, self.eval_bs), self.recipe.runtime.num_workers, self.pin)
        task = progress.add_task("  validating", total=len(mine), stats="")
        logits = predict_logits(self.raw_model, loader, self.device, self.amp_dtype,
                                self.channels_last, on_batch=lambda n: progress.advance(task, n))
        progress.remove_task(task)
        if logits.numel() == 0:
            logits = torch.zeros(0, len(self.classes))
        return distributed.gather_rows(self.info, logits, self.device)

    def _val_loss(self, logits: torch.Tensor) -> float:
        """Per-image validation loss over chunks of one micro-batch (independent of the process count)."""
        chunk = self.micro_batch * self.info.world
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(logits), chunk):
                part = logits[i:i + chunk].to(self.device)
                value = self.loss_fn(part, self.val_targets[i:i + chunk].to(self.device)).item()
                total += self._per_image(value, len(part))
                count += 1
        return total / max(count, 1)

    def _per_image(self, value: float, n: int) -> float:
        """A batch's loss as reported: sum-reduced losses (P-ASL, ASL) divided by its n images."""
        return value / n if self.loss_fn.reduction == "sum" else value

    def _write_metrics(self, rows: list[dict]) -> None:
        lines = [",".join(METRIC_COLUMNS)]
        lines += [",".join(_fmt(row[c]) for c in METRIC_COLUMNS) for row in rows]
        write_text_atomic(self.run_dir / "metrics.csv", "\n".join(lines) + "\n")

    def _write_submission(self) -> None:
        """submission.csv of the best checkpoint, in the row order of sample_submission.csv."""
        from aicoss_cli.checkpoint import load_checkpoint

        state, _ = load_checkpoint(self.run_dir / "best.safetensors")
        self.raw_model.load_state_dict(state)
        test = self.data.test
        test_set = ImageDataset(test.paths, None, self.recipe.model.img_size)
        loader = make_loader(test_set, eval_batches(np.arange(len(test_set)), self.eval_bs),
                             self.recipe.runtime.num_workers, self.pin)
        with progress_display(self.console, transient=True) as progress:
            task = progress.add_task("predicting the test set", total=len(test_set), stats="")
            logits = predict_logits(self.raw_model, loader, self.device, self.amp_dtype,
                                    self.channels_last, on_batch=lambda n: progress.advance(task, n))
        write_scores_csv(self.run_dir / "submission.csv", test.ids, test.classes, torch.sigmoid(logits))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if value == value else "nan"
    return str(value)
