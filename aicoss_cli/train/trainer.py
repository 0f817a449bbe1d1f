"""The one training loop of aicoss: `Trainer`.

    from aicoss_cli.train import Trainer
    result = Trainer(recipe, out="runs").run()       # recipe: a resolved `aicoss_cli.recipe.Recipe`

Set-up lives in `_setup_*` methods that return what they build; the loop prints nothing but its
progress. The pieces it is built from live in their own modules: the data checks in `prepare`,
the optimizer step, schedule and EMA in `step`, the batches in `data.samplers`, what an epoch
keeps in `keep` (its file names and the best epoch in `results.layout`), the run folder and its
stops in `run_dir`, the resumable state in `state`, the live summary and curves in `watch`, a teacher in `distill`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.markup import escape

from aicoss_cli.base import distributed
from aicoss_cli.base.console import LogLines, clock, progress_display
from aicoss_cli.base.errors import TrainingStopped, UserError
from aicoss_cli.base.files import check_writable_folder, write_text_atomic
from aicoss_cli.base.runtime import Runtime, configure_kernels, make_runtime, precision_dtype, seed_everything
from aicoss_cli.data.loading import ImageDataset, Normalizer
from aicoss_cli.data.samplers import TrainBatches, make_loader, micro_batch_size, shard
from aicoss_cli.data.submission import write_scores_csv
from aicoss_cli.data.transforms import build_train_transform
from aicoss_cli.evaluation.metrics import mean_average_precision, skipped_classes
from aicoss_cli.infer.forward import Member, forward
from aicoss_cli.losses.registry import per_image_loss
from aicoss_cli.models.checkpoint import CheckpointMeta, load_checkpoint
from aicoss_cli.recipe import Recipe, recipe_to_toml
from aicoss_cli.results import layout
from aicoss_cli.results.layout import PRIOR_FILE, RECIPE_FILE, STATE_FILE, SUBMISSION_FILE
from aicoss_cli.train import keep
from aicoss_cli.train.distill import build_distillation, distill_meta, train_items
from aicoss_cli.train.prepare import PreparedData, prepare_data
from aicoss_cli.train.prior import PriorTracker, write_prior_csv
from aicoss_cli.train.run_dir import (
    RunLock,
    StopFlag,
    ignore_sigint,
    nonfinite_loss,
    open_run_dir,
    stop_when_writes_fail,
)
from aicoss_cli.train.state import Resume, StepBoundary, TrainProgress, restore, rng_state, save_train_state
from aicoss_cli.train.step import TrainStep, build_ema, build_optimizer, learning_rate
from aicoss_cli.train.watch import RunWatch

SYNC_EVERY_S = 1.0  # the loop reads device values (running loss, the non-finite flag) at most this often


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    best_epoch: int
    best_map: float
    skipped_classes: int
    notes: list[str] = field(default_factory=list)


class Callback:
    """Hooks into a run, called on rank 0 only; override what you need.

    - `on_run_start`: the run folder exists, nothing is trained yet (an error here stops the run);
    - `on_log`: about once a second, {"step", "loss", "lr", "img_per_s"};
    - `on_epoch_end`: the epoch's metrics.csv row; `trainer.val_probs` holds its val probabilities.
      Returning True ends the run after this epoch (a tuner pruning a bad trial, early stopping);
      it then finishes normally, with the submission of the best checkpoint;
    - `on_run_end`: the result, or None when the run stopped (an error, Ctrl-C, a bad image)."""

    def on_run_start(self, trainer: Trainer) -> None: ...

    def on_log(self, trainer: Trainer, values: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> bool | None: ...

    def on_run_end(self, trainer: Trainer, result: RunResult | None) -> None: ...


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train one resolved recipe into a run folder: the one training loop of aicoss.

    Features:
    - One process or many: under torchrun (`aicoss train --nproc N`) DDP with NCCL on GPUs, gloo on
      CPUs. `[optim] batch_size` is the global batch; optimizer step t always trains on the same rows
      of the epoch's seeded permutation whatever the number of processes, and gradient accumulation
      splits it into equal micro-batches, so 1 GPU with accumulation trains as N GPUs without.
    - fp32, bf16 or fp16 autocast; the optimizer step goes through a grad scaler in every precision
      (dynamic scaling in fp16 only), so a step with non-finite gradients is skipped on the device
      without a host sync; channels_last, torch.compile, cuDNN autotuning or deterministic kernels.
    - AdamW; per-step linear warm-up, then cosine annealing stepped per epoch (`learning_rate`).
    - Every epoch: validation loss and macro mAP, `metrics.csv`, `last.safetensors`, and on a better
      val mAP `best.safetensors` and `val_scores.csv`; at the end `submission.csv` of the best
      checkpoint. Validation and the submission go through `infer.forward`, the loop `predict`
      uses, so `submission.csv` equals `aicoss predict best.safetensors`.
    - The class prior of P-ASL (`prior.PriorTracker`), fixed or from the previous epoch's predictions.
    - Exact resume: `train_state.safetensors` after every epoch (and every
      `[runtime] checkpoint_every` steps) holds model, optimizer, scaler, every RNG and the position
      in the epoch; with `[runtime] deterministic` on the CPU a resumed run is bit-identical.
    - Stops cleanly: Ctrl-C / SIGTERM save a resumable state at the next step boundary; an image that
      fails to decode stops the run at the boundary before it, resumable; a non-finite loss stops it
      (the step is skipped on the device; the loop notices at its next sync, at most a second later,
      and before anything is saved).
    - `callbacks`: see `Callback` (tracking, live pictures, tuners).
    - Distillation (a recipe's `[distill]` table): the loss also learns an ensemble's outputs (`distill`).

    Limits: the loop reads the running loss from the device about once a second (the progress
    display updates its loss then); resuming on another number of processes keeps the data order
    but not the augmentation and dropout noise; the two-way loss normalises per micro-batch, so
    with accumulation it is not exactly the loss of the whole batch.
    """

    def __init__(self, recipe: Recipe, out: Path | str = "runs", *, resume: Resume | None = None, console=None,
                 callbacks: Sequence[Callback] = (), run_dir: Path | None = None):
        self.recipe = resume.recipe if resume is not None else recipe
        self.out, self.folder = Path(out), run_dir  # folder: write there, not to out/<name>/<timestamp>
        self.resume = resume
        self.console = console
        self.callbacks = [RunWatch(self._warn), *callbacks]
        self.notes: list[str] = list(resume.notes) if resume is not None else []
        self.eval_img_per_s: float | None = None  # of the last validation or test pass
        self.val_probs: np.ndarray | None = None  # of the last epoch (rank 0)
        self.lock: RunLock | None = None  # the run folder's, held by rank 0 while it trains

    # -- the run

    def run(self) -> RunResult:
        r = self.recipe
        use_cuda = r.runtime.device != "cpu" and torch.cuda.is_available()
        self.info = distributed.setup(use_cuda)
        deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        result, started = None, False
        try:
            self.setup()
            for note in self.notes:
                self._say(f"[yellow]note:[/] {escape(note)}")
            self._say(f"run folder: {escape(str(self.run_dir))}")
            self._each_callback("on_run_start", self)
            started = True
            with StopFlag() as stop, self._progress() as bar, stop_when_writes_fail(self.run_dir):
                while self.progress.epoch < r.optim.epochs and not self.progress.stopped_early:
                    self._train_epoch(bar, stop)
                    self._end_epoch(bar)
                if self.info.main:
                    self._write_submission()
            distributed.barrier(self.info)
            skipped = skipped_classes(self.val_targets)
            if skipped:
                self.notes.append(f"{skipped} of {len(self.classes)} classes have no positive in the val split; "
                                  "val mAP averages the others")
            p = self.progress
            result = RunResult(self.run_dir, p.rows, p.best_epoch, p.best_map, skipped, self.notes)
            return result
        finally:
            if started:
                self._each_callback("on_run_end", self, result)
            if self.lock is not None:
                self.lock.release()
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # process-wide
            distributed.teardown(self.info)

    def setup(self) -> None:
        """Build everything the loop holds; each `_setup_*` returns what it builds."""
        r, state = self.recipe, self.resume.state if self.resume else None
        if self.resume is not None and self.resume.out is None:
            check_writable_folder(self.resume.source, "--resume")
        else:
            check_writable_folder(self.resume.out if self.resume else self.out)
        self.rt = self._setup_runtime()
        self.micro_batch = micro_batch_size(r.optim.batch_size, r.optim.grad_accumulation, self.info.world)
        self.data = self._setup_data()
        self.classes = self.data.table.classes
        self.val_targets = self.data.table.labels[self.data.val_rows]
        self.eval_batch = r.runtime.eval_batch_size or self.micro_batch
        self.distill = build_distillation(r, self.data, self.eval_rt, self.eval_batch, self.resume, self.notes,
                                          self.console if self.info.main else None)  # None without [distill]
        self.raw_model, self.model = self._setup_model(pretrained=r.model.pretrained if state is None else False)
        self.loss_fn, self.prior = self._setup_loss()
        self.optimizer, self.scaler = build_optimizer(self.raw_model, r.optim, self.rt)
        self.ema = build_ema(self.raw_model, r.optim)
        self.progress = TrainProgress(split=self.data.split)
        if state is not None:
            self._restore(state)
        else:
            seed_everything(r.runtime.seed + 1_000 * self.info.rank)  # same init everywhere, own noise per rank
        self.run_dir = self._setup_run_dir()
        if self.prior is not None:
            self.prior.apply(self.loss_fn)
        transform = build_train_transform(r.augment.policy, r.augment.magnitude, r.augment.num_ops,
                                          r.augment.cutout_factor)
        paths, labels, self.train_rows = train_items(self.data, self.distill)
        self.train_set = ImageDataset(paths, labels, r.model.img_size, transform, r.data.exif_transpose)
        # DDP averages gradients over ranks and accumulation sums them: scale so that one optimizer step
        # follows the gradient of the recipe's loss on the whole global batch
        micro_scale = self.info.world if self.loss_fn.reduction == "sum" else 1.0 / r.optim.grad_accumulation
        self.step = TrainStep(self.model, self.raw_model, self.loss_fn, self.optimizer, self.scaler, self.ema, self.rt,
                              micro_scale, r.optim.clip_grad_norm, self.info.active)

    def _setup_runtime(self) -> Runtime:
        """The training runtime; `self.eval_rt` is the same in `[runtime] eval_precision`."""
        rt_cfg = self.recipe.runtime
        local_rank = self.info.local_rank if self.info.active else None
        rt = make_runtime(rt_cfg.device, rt_cfg.precision, rt_cfg.num_workers, channels_last=rt_cfg.channels_last,
                          local_rank=local_rank, where="[runtime] device")
        self.eval_rt = rt.with_precision(precision_dtype(rt_cfg.eval_precision, rt.device, rt.notes))
        self.notes += list(dict.fromkeys(rt.notes))  # the eval runtime may repeat a fallback note
        configure_kernels(rt.device, rt_cfg.deterministic)
        return rt

    def _setup_data(self) -> PreparedData:
        r = self.recipe
        with progress_display(self.console, enabled=self.info.main and self.console is not None,
                              transient=True) as progress:
            data = prepare_data(r, progress if self.info.main else None)
        if self.resume is not None:
            saved = self.resume.state.progress.split
            if saved.get("val_fingerprint") and saved["val_fingerprint"] != data.split["val_fingerprint"]:
                raise UserError(f"{r.data.root}: its train/val split differs from the one {self.resume.source} "
                                "was trained on (another train.csv?); resume with the --data it trained on")
        return data

    def _setup_model(self, pretrained) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model itself, what the loop calls: wrapped in DDP and compiled as the recipe asks)."""
        from aicoss_cli.models import build_model

        r, info = self.recipe, self.info
        seed_everything(r.runtime.seed)
        model = build_model(r.model.arch, len(self.classes), pretrained=pretrained, img_size=r.model.img_size)
        model.to(self.rt.device)
        if self.rt.channels_last:
            model.to(memory_format=torch.channels_last)
        raw = model
        if info.active:
            if r.runtime.sync_bn:
                model = raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None)
        if r.runtime.compile:
            model = torch.compile(model)
        return raw, model

    def _setup_loss(self) -> tuple[torch.nn.Module, PriorTracker | None]:
        from aicoss_cli.losses.registry import build_loss

        r = self.recipe
        loss_fn = build_loss(r.loss.name, **r.loss.params())
        train_labels = self.data.table.labels[self.data.train_rows]
        prior = PriorTracker.from_recipe(r.loss.prior, r.loss.name, r.loss.params(), self.classes, train_labels,
                                         self.rt.device, self.notes)
        return loss_fn, prior

    def _restore(self, state) -> None:
        self.progress = restore(state, self.raw_model, self.optimizer, self.scaler, self.ema, self.info, self.notes)
        if self.progress.prior is not None and self.prior is not None:
            self.prior.prior = torch.tensor(self.progress.prior)

    def _setup_run_dir(self) -> Path:
        """The run folder (a new one, the resumed one, or a fork of it), locked by rank 0."""
        run_dir = open_run_dir(self.info, self.out, self.recipe, self.resume, self.notes, self.folder)
        if self.info.main:
            self.lock = RunLock(run_dir).acquire()
            write_text_atomic(run_dir / RECIPE_FILE, recipe_to_toml(self.recipe))
            if self.distill is not None:
                self.distill.write(run_dir)
        return run_dir

    # -- one epoch

    def _train_epoch(self, bar, stop: StopFlag) -> None:
        r, info, rt, p = self.recipe, self.info, self.rt, self.progress
        epoch, start_step = p.epoch, p.step
        sampler = TrainBatches(self.train_rows, r.optim.batch_size, r.optim.grad_accumulation, info.rank,
                               info.world, r.runtime.seed, epoch, start_step=start_step,
                               augment=r.augment.policy != "none")
        loader = make_loader(self.train_set, sampler, rt.workers, rt.pin,
                             worker_init_fn=ignore_sigint if rt.workers else None)
        steps, accumulation = sampler.steps, r.optim.grad_accumulation
        normalize = Normalizer(rt.device, torch.channels_last if rt.channels_last else torch.contiguous_format)
        if self.prior is not None:
            self.prior.restore(p.prior_sums if p.loss_count else None)
        loss_sum = torch.tensor(p.loss_sum, dtype=torch.float64, device=rt.device)
        loss_count, step, micro, base_seconds = p.loss_count, start_step, 0, p.seconds
        step_finite = torch.ones((), dtype=torch.bool, device=rt.device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=rt.device)  # first step with a non-finite loss
        task = bar.add_task(f"epoch {epoch + 1}/{r.optim.epochs}", total=steps, completed=step, stats="")
        log_lines = LogLines(steps, enabled=self.console is not None and not self._terminal)
        t0 = last_sync = time.perf_counter()
        seen, bad = 0, ""
        boundary = self._boundary(loss_sum, loss_count, base_seconds)
        self.model.train()
        for images, targets, index, errors in loader:
            bad = bad or next((e for e in errors if e), "")
            batch = images.to(rt.device, non_blocking=rt.pin)
            x, y = normalize(batch), targets.to(rt.device, non_blocking=rt.pin)
            last_micro = micro == accumulation - 1
            logits, detached = self.step.backward(x, y, last_micro, self.distill and self.distill.targets(batch, index))
            step_finite &= torch.isfinite(detached)
            loss_sum += detached.double() / len(images) if self.loss_fn.reduction == "sum" else detached.double()
            loss_count += 1
            if self.prior is not None:
                self.prior.observe(logits)
            seen += len(images)
            micro += 1
            if not last_micro:
                continue
            micro = 0
            first_bad = torch.where((first_bad < 0) & ~step_finite, step + 1, first_bad)
            any_bad, any_stop, any_nonfinite = self._step_flags(bad, stop.requested, step_finite)
            if any_bad:
                self._stop_for_bad_image(bad, boundary, epoch, step)
            if any_nonfinite:  # under DDP, perhaps another rank's loss
                first_bad.fill_(step + 1)
                self._check_finite(first_bad, epoch, p.global_step - step)
            step_finite.fill_(True)
            self.lr = learning_rate(r.optim, epoch, step, steps)
            step += 1
            p.global_step += 1
            self.step.optimize(self.lr, p.global_step)
            now = time.perf_counter()
            boundary = self._boundary(loss_sum, loss_count, base_seconds + now - t0)
            save_now = bool(r.runtime.checkpoint_every) and p.global_step % r.runtime.checkpoint_every == 0 \
                and step < steps
            log_line = log_lines.due(step, now - t0)
            if any_stop or save_now or log_line or now - last_sync >= SYNC_EVERY_S:
                last_sync = now
                self._check_finite(first_bad, epoch, p.global_step - step)
                values = {"step": p.global_step, "loss": float(loss_sum) / loss_count, "lr": self.lr,
                          "img_per_s": seen * info.world / max(now - t0, 1e-9)}
                stats = f"loss {values['loss']:.4f}  {values['img_per_s']:.0f} img/s"
                bar.update(task, stats=stats)
                if log_line:
                    eta = (now - t0) / (step - start_step) * (steps - step)
                    self._say(f"epoch {epoch + 1}/{r.optim.epochs}  step {step}/{steps}  {stats}  eta {clock(eta)}")
                self._each_callback("on_log", self, values)
            bar.advance(task)
            if any_stop or save_now:
                self.progress.at_boundary(step, boundary)
                self._save_state()
                if any_stop:
                    raise TrainingStopped(f"interrupted at epoch {epoch + 1}, step {step}; resumable state saved: "
                                          f"continue with `aicoss train --resume {self.run_dir}`", exit_code=130)
        self._check_finite(first_bad, epoch, p.global_step - step)
        self.progress.at_boundary(step, self._boundary(loss_sum, loss_count, base_seconds + time.perf_counter() - t0))
        p.train_seconds += p.seconds
        p.train_images += steps * r.optim.batch_size
        bar.update(task, stats=f"loss {p.loss_sum / max(p.loss_count, 1):.4f}")
        self.lr = learning_rate(r.optim, epoch, max(steps - 1, 0), steps)

    def _boundary(self, loss_sum: torch.Tensor, loss_count: int, seconds: float) -> StepBoundary:
        """The state at a step boundary; device values are copied on the device (no host sync)."""
        prior_sums = self.prior.snapshot() if self.prior is not None else None
        return StepBoundary(loss_sum.clone(), loss_count, prior_sums, rng_state(), seconds)

    def _step_flags(self, bad: str, stop: bool, step_finite: torch.Tensor) -> tuple[bool, bool, bool]:
        """(some rank read a bad image, some rank was asked to stop, some rank's loss was non-finite):
        one collective under DDP; alone, the host knows the first two and the third waits for a sync."""
        if not self.info.active:
            return bool(bad), stop, False
        flags = torch.stack([torch.tensor(float(bool(bad)), device=self.rt.device),
                             torch.tensor(float(stop), device=self.rt.device), (~step_finite).float()])
        values = distributed.all_reduce_sum(self.info, flags).tolist()
        return values[0] > 0, values[1] > 0, values[2] > 0

    def _check_finite(self, first_bad: torch.Tensor, epoch: int, epoch_start_global: int) -> None:
        """Stop if a step had a non-finite loss (its update was skipped on the device; nothing after it is
        saved). Reads one device value: called at the loop's syncs."""
        step = int(first_bad)
        if step >= 0:
            raise nonfinite_loss(self.run_dir, epoch, step, epoch_start_global + step)

    def _stop_for_bad_image(self, bad: str, boundary: StepBoundary, epoch: int, step: int) -> None:
        message = next(m for m in distributed.all_gather_objects(self.info, bad) if m)
        self.progress.at_boundary(step, boundary)
        self._save_state(rng=boundary.rng)
        raise TrainingStopped(
            f"{message}. Training stopped at epoch {epoch + 1}, step {step}; fix or remove the file and "
            f"continue with `aicoss train --resume {self.run_dir}`", exit_code=2)

    # -- the end of an epoch

    def _end_epoch(self, bar) -> None:
        """Reduce the loss over ranks, validate (raw and EMA weights), write metrics and checkpoints,
        save the resumable state; `progress.stopped_early` when the run ends here (early stopping, a
        callback)."""
        info, p = self.info, self.progress
        epoch = p.epoch
        totals = distributed.all_reduce_sum(
            info, torch.tensor([p.loss_sum, float(p.loss_count)], device=self.rt.device)).cpu()
        train_loss = float(totals[0] / max(float(totals[1]), 1.0))
        t_val = time.perf_counter()
        val_logits = self._validate(bar, self.raw_model)
        ema_logits = None
        if self.ema is not None:
            distributed.broadcast_tensors(info, list(self.ema.module.buffers()))  # one EMA on every rank
            ema_logits = self._validate(bar, self.ema.module)
        used_prior = None if self.prior is None or self.prior.prior is None else self.prior.prior.tolist()
        if self.prior is not None:
            self.prior.end_epoch(lambda t: distributed.all_reduce_sum(info, t), self.loss_fn)
        seconds = p.seconds + (time.perf_counter() - t_val)
        stop = False
        if info.main:
            row = {"epoch": epoch + 1, "lr": self.lr, "train_loss": train_loss, "val_loss": per_image_loss(
                       self.loss_fn, val_logits, self.val_targets, self.micro_batch * info.world, self.rt.device),
                   "val_map": mean_average_precision(self.val_targets, torch.sigmoid(val_logits).numpy()),
                   "seconds": round(seconds, 3)}
            if ema_logits is not None:
                row[layout.EMA_COLUMN] = mean_average_precision(self.val_targets, torch.sigmoid(ema_logits).numpy())
            p.rows.append(row)
            stop = self._keep(row, ema_logits if layout.uses_ema(row) else val_logits, used_prior)
            stop = any(self._each_callback("on_epoch_end", self, row)) or stop
        p.rows, p.best_map, p.best_epoch, stop = distributed.broadcast_object(
            info, (p.rows, p.best_map, p.best_epoch, stop))
        p.epoch, p.step, p.loss_sum, p.loss_count, p.seconds, p.prior_sums = epoch + 1, 0, 0.0, 0, 0.0, None
        p.prior = None if self.prior is None or self.prior.prior is None else self.prior.prior.tolist()
        p.stopped_early = p.stopped_early or stop
        self._save_state()

    def _keep(self, row: dict, logits: torch.Tensor, used_prior: list[float] | None) -> bool:
        """Write what the epoch keeps (rank 0; see `keep.keep_epoch`) and say so; True when early
        stopping ends the run here."""
        r, p = self.recipe, self.progress
        weights = (self.ema.module if layout.uses_ema(row) else self.raw_model).state_dict()
        meta = CheckpointMeta(arch=r.model.arch, img_size=r.model.img_size, classes=self.classes,
                              recipe_toml=recipe_to_toml(r), epoch=row["epoch"], val_map=layout.score(row),
                              split=self.data.split, prior=used_prior,
                              extra={"weights": "ema" if layout.uses_ema(row) else "raw", **distill_meta(self.distill)})
        self.val_probs = torch.sigmoid(logits).numpy()
        val_ids = [self.data.table.ids[i] for i in self.data.val_rows]
        best = keep.keep_epoch(self.run_dir, r, p, weights, meta, val_ids, self.val_probs, ema=self.ema is not None)
        if self.prior is not None and self.prior.prior is not None:
            write_prior_csv(self.run_dir / PRIOR_FILE, self.classes, self.prior.prior.tolist())
        ema_text = f"  val_mAP_ema {row[layout.EMA_COLUMN]:.4f}" if self.ema is not None else ""
        self._say(f"epoch {row['epoch']}/{r.optim.epochs}  train_loss {row['train_loss']:.4f}  val_loss "
                  f"{row['val_loss']:.4f}  val_mAP {row['val_map']:.4f}{ema_text}{'  (best)' if best else ''}  "
                  f"{row['seconds']:.1f}s")
        if row["epoch"] < r.optim.epochs and keep.stop_early(p.rows, p.best_epoch, r.optim.early_stop_patience):
            self.notes.append(f"early stop after epoch {row['epoch']}: no better val mAP for "
                              f"{r.optim.early_stop_patience} epochs (best {p.best_map:.4f} at epoch {p.best_epoch})")
            self._say(f"[yellow]early stop:[/] {escape(self.notes[-1])}")
            return True
        return False

    def _validate(self, bar, model: torch.nn.Module) -> torch.Tensor:
        """Validation logits of every rank's shard, gathered in val order (no padding duplicates), in
        `[runtime] eval_precision`."""
        mine = shard(self.data.val_rows, self.info.rank, self.info.world)
        member = Member(path="", model=model, img_size=self.recipe.model.img_size, classes=self.classes,
                        exif_transpose=self.recipe.data.exif_transpose)
        t0 = time.perf_counter()
        logits = forward([member], [self.data.table.paths[i] for i in mine], self.eval_rt, self.eval_batch,
                         logits=True, progress=bar, what="  validating")[0]
        self.eval_img_per_s = len(mine) * self.info.world / max(time.perf_counter() - t0, 1e-9)
        return distributed.gather_rows(self.info, logits, self.rt.device)

    def _save_state(self, rng: dict | None = None) -> None:
        """Resumable state as of the last step boundary (a collective: every rank calls it)."""
        states = distributed.all_gather_objects(self.info, rng if rng is not None else rng_state())
        if self.info.main:
            extra = {} if self.ema is None else {f"ema.{k}": v for k, v in self.ema.module.state_dict().items()}
            save_train_state(self.run_dir / STATE_FILE, model=self.raw_model.state_dict(),
                             optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), rng=states,
                             progress=self.progress, recipe_toml=recipe_to_toml(self.recipe), extra=extra)

    def _write_submission(self) -> None:
        """submission.csv of the kept checkpoint (`[runtime] keep`), in the row order of
        sample_submission.csv."""
        state, _ = load_checkpoint(layout.kept_file(self.run_dir, self.recipe.runtime.keep))
        self.raw_model.load_state_dict(state)
        test = self.data.test
        member = Member(path="", model=self.raw_model, img_size=self.recipe.model.img_size, classes=self.classes,
                        exif_transpose=self.recipe.data.exif_transpose)
        with progress_display(self.console, enabled=self.console is not None, transient=True) as bar:
            t0 = time.perf_counter()
            probs = forward([member], test.paths, self.eval_rt, self.eval_batch, progress=bar,
                            what="predicting the test set")[0]
            self.eval_img_per_s = len(test.paths) / max(time.perf_counter() - t0, 1e-9)
        write_scores_csv(self.run_dir / SUBMISSION_FILE, test.ids, test.classes, probs)

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

    def _warn(self, text: str) -> None:
        self._say(f"[yellow]warning:[/] {escape(text)}")

    def _each_callback(self, hook: str, *args) -> list:
        if not self.info.main:
            return []
        return [getattr(cb, hook)(*args) for cb in self.callbacks]


def train(recipe: Recipe, out: Path | str = "runs", *, resume: Resume | None = None, console=None,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train `recipe` (already resolved) into a new run folder under `out`, or continue `resume`."""
    return Trainer(recipe, out, resume=resume, console=console, callbacks=callbacks).run()

