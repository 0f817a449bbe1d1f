"""Experiment tracking: TensorBoard and MLflow behind one small interface the Trainer calls.

    trackers = open_trackers(recipe.runtime.loggers, run_dir, out_dir, recipe_toml, params, resumed, warn)
    trackers.log_train(step, {"loss": ..., "lr": ..., "img_per_s": ...})        # every log interval
    trackers.log_epoch(epoch, step, {"train_loss": ..., "val_loss": ..., "val_map": ...}, per_class_ap={...})
    trackers.close("finished", artifacts=[run_dir / "recipe.toml", run_dir / "metrics.csv", run_dir / "curves.png"])

Rank 0 alone calls it. A missing extra is a `UserError` at open (before any compute); a backend
that fails later (a server gone, a full disk) is one warning and is then switched off: tracking
never stops a training run. Each backend is imported when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlparse

from aicoss_cli.base.errors import UserError, one_line
from aicoss_cli.results.layout import MLFLOW_RUN_FILE

TRACKERS = ("tensorboard", "mlflow")
MLFLOW_RUN_FORMAT = "aicoss-mlflow-run/1"
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
CONNECT_TIMEOUT_S = 5.0

Warn = Callable[[str], None]


def open_trackers(names: Iterable[str], run_dir: str | Path, out_dir: str | Path, recipe_toml: str,
                  params: Mapping[str, Any], resumed: bool, warn: Warn) -> Trackers:
    """Open the named trackers (`[runtime] loggers`) for one run folder.

    `out_dir` is the train --out folder (MLflow's default store, `<out>/mlflow.db`, lives there);
    `params` is the flattened resolved recipe (`recipe_params`); `resumed` continues the run's
    earlier logs (the same MLflow run, TensorBoard steps from the restart on replace the old ones).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    backends: list[_Backend] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            backends.append(TensorBoardTracker(run_dir, recipe_toml, params, resumed))
        elif name == "mlflow":
            backend = MlflowTracker.open(run_dir, out_dir, recipe_toml, params, resumed, warn)
            if backend is not None:
                backends.append(backend)
        else:
            raise UserError(f"[runtime] loggers: unknown tracker {name!r}; use {' or '.join(map(repr, TRACKERS))}")
    return Trackers(backends, warn)


def recipe_params(recipe) -> dict[str, bool | int | float | str]:
    """A resolved recipe flattened to `section.key` parameters (unset keys left out, lists as text)."""
    data = recipe.model_dump()
    flat: dict[str, Any] = {"name": data.pop("name"), "description": data.pop("description")}
    for section, values in data.items():
        for key, value in (values or {}).items():  # an optional section the recipe lacks is None
            if value is not None:
                flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


class Trackers:
    """The open backends; each call goes to every backend still on."""

    def __init__(self, backends: list[_Backend], warn: Warn):
        self.backends, self.warn, self.closed = backends, warn, False

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log_train(self, step: int, values: Mapping[str, float]) -> None:
        self._each("log_train", int(step), _numbers(values))

    def log_epoch(self, epoch: int, step: int, values: Mapping[str, float],
                  per_class_ap: Mapping[str, float] | None = None) -> None:
        aps = {str(k): v for k, v in _numbers(per_class_ap or {}).items() if math.isfinite(v)}
        self._each("log_epoch", int(epoch), int(step), _numbers(values), aps)

    def close(self, status: str, artifacts: Iterable[str | Path] = ()) -> None:
        """End the run: `status` is "finished", "stopped" (resumable) or "failed"; existing
        `artifacts` are stored with the MLflow run. A second close does nothing."""
        if self.closed:
            return
        self.closed = True
        files = [Path(a) for a in artifacts if Path(a).is_file()]
        self._each("close", status, files)

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # tracking must never stop training
                self.backends.remove(backend)
                self.warn(f"{backend.name}: logging failed ({type(exc).__name__}: {one_line(exc)}); "
                          f"{backend.name} tracking is off for the rest of this run")


class _Backend:
    name = ""

    def log_train(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, epoch: int, step: int, values: dict[str, float], aps: dict[str, float]) -> None: ...

    def close(self, status: str, artifacts: list[Path]) -> None: ...


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker(_Backend):
    """Event files in `<run dir>/tensorboard/`: train/loss, train/lr, train/img_per_s at every log
    interval, val/loss, val/mAP (val/mAP_ema), val/AP/<class> every epoch, all against the optimizer step; the
    resolved recipe as text and its parameters in the HParams tab."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, recipe_toml: str, params: Mapping[str, Any], resumed: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("[runtime] loggers = [\"tensorboard\"] needs TensorBoard: "
                            "pip install 'aicoss[tensorboard]'") from None
        self._writer_class, self.log_dir, self.writer = SummaryWriter, run_dir / "tensorboard", None
        self._tags: dict[str, str] = {}
        if not resumed:
            self._open(purge_step=None)
            self.writer.add_text("recipe", "\n".join("    " + line for line in recipe_toml.splitlines()))
            self._hparams(params)

    def _open(self, purge_step: int | None) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=30)

    def _ensure(self, step: int) -> None:
        # a resumed run purges what the stopped process logged from its first new step on
        if self.writer is None:
            self._open(purge_step=step)

    def _hparams(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {_tag(k): v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
        for summary in hparams(values, {"val/mAP": 0.0, "val/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def log_train(self, step: int, values: dict[str, float]) -> None:
        self._ensure(step)
        for key, value in values.items():
            self.writer.add_scalar(f"train/{_tag(key)}", value, step)

    def log_epoch(self, epoch: int, step: int, values: dict[str, float], aps: dict[str, float]) -> None:
        self._ensure(step)
        names = {"val_loss": "val/loss", "val_map": "val/mAP", "val_map_ema": "val/mAP_ema",
                 "train_loss": "train/epoch_loss"}
        for key, value in values.items():
            self.writer.add_scalar(names.get(key, f"epoch/{_tag(key)}"), value, step)
        self.writer.add_scalar("epoch", epoch, step)
        for tag, value in _unique_tags(aps, self._tags).items():
            self.writer.add_scalar(f"val/AP/{tag}", value, step)
        self.writer.flush()

    def close(self, status: str, artifacts: list[Path]) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- MLflow


class MlflowTracker(_Backend):
    """One MLflow run per aicoss run (experiment = recipe name, run name = the run folder's name):
    params = the flattened recipe; metrics train_loss, val_loss, val_mAP (val_mAP_ema), val_AP/<class> per epoch
    (step = epoch) and lr, train_batch_loss, train_img_per_s per log interval (step = optimizer
    step); artifacts at close. The store: MLFLOW_TRACKING_URI, else `sqlite:///<out>/mlflow.db`."""

    name = "mlflow"

    def __init__(self, client, run_id: str, last_epoch: int, last_step: int):
        self.client, self.run_id = client, run_id
        self.last_epoch, self.last_step = last_epoch, last_step  # a resumed run logs each epoch and step once
        self._tags: dict[str, str] = {}

    @classmethod
    def open(cls, run_dir: Path, out_dir: Path, recipe_toml: str, params: Mapping[str, Any], resumed: bool,
             warn: Warn) -> MlflowTracker | None:
        """The tracker, or None (after a warning) when the tracking server cannot be reached."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("[runtime] loggers = [\"mlflow\"] needs MLflow: pip install 'aicoss[mlflow]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir)
        unreachable = _unreachable(uri)
        if unreachable:
            warn(f"mlflow: tracking server {uri} cannot be reached ({unreachable}); training goes on without MLflow")
            return None
        try:
            with _quiet_store_setup():
                client = MlflowClient(tracking_uri=uri)
                run_id, last_epoch, last_step = _start_run(client, uri, run_dir, out_dir, recipe_toml, params,
                                                           resumed, warn)
        except UserError:
            raise
        except Exception as exc:
            warn(f"mlflow: cannot start a run at {uri} ({type(exc).__name__}: {one_line(exc)}); "
                 "training goes on without MLflow")
            return None
        return cls(client, run_id, last_epoch, last_step)

    def log_train(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        names = {"loss": "train_batch_loss", "lr": "lr", "img_per_s": "train_img_per_s"}
        self._log({names.get(k, f"train_{_tag(k)}"): v for k, v in values.items()}, step)
        self.last_step = step

    def log_epoch(self, epoch: int, step: int, values: dict[str, float], aps: dict[str, float]) -> None:
        if epoch <= self.last_epoch:
            return
        names = {"val_map": "val_mAP", "val_map_ema": "val_mAP_ema"}
        metrics = {names.get(k, _tag(k)): v for k, v in values.items()}
        metrics.update({f"val_AP/{tag}": v for tag, v in _unique_tags(aps, self._tags).items()})
        self._log(metrics, epoch)
        self.last_epoch = epoch

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self, status: str, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_tag(self.run_id, "aicoss.status", status)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def default_tracking_uri(out_dir: str | Path) -> str:
    """A SQLite store beside the runs: `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`."""
    return "sqlite:///" + str(Path(out_dir).resolve() / "mlflow.db")


def _start_run(client, uri: str, run_dir: Path, out_dir: Path, recipe_toml: str, params: Mapping[str, Any],
               resumed: bool, warn: Warn) -> tuple[str, int, int]:
    """(run id, last epoch logged, last step logged): the run folder's own MLflow run when resumed, else a new one."""
    if resumed:
        found = _recorded_run(client, uri, run_dir, warn)
        if found is not None:
            client.update_run(found, status="RUNNING")
            return found, _last_step(client, found, "val_mAP"), _last_step(client, found, "lr")
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = _experiment(client, _experiment_name(recipe_toml, run_dir), uri, out_dir)
    run = client.create_run(experiment_id, run_name=run_dir.name,
                            tags={"aicoss.run_dir": str(run_dir.resolve()), "aicoss.status": "training"})
    run_id = run.info.run_id
    from mlflow.entities import Param

    batch = [Param(_tag(k)[:250], str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=batch[i:i + 100])
    client.set_tag(run_id, "mlflow.note.content", "Resolved recipe:\n\n```toml\n" + recipe_toml + "\n```")
    from aicoss_cli.base.files import write_text_atomic

    write_text_atomic(run_dir / MLFLOW_RUN_FILE, json.dumps(
        {"format": MLFLOW_RUN_FORMAT, "run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri},
        indent=2) + "\n")
    return run_id, 0, -1


def _recorded_run(client, uri: str, run_dir: Path, warn: Warn) -> str | None:
    """The run id kept in the run folder, if it names a run of this store."""
    path = run_dir / MLFLOW_RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        run_id = data["run_id"] if data.get("format") == MLFLOW_RUN_FORMAT else None
        stored_uri = data.get("tracking_uri")
    except FileNotFoundError:
        warn(f"mlflow: {run_dir} has no {MLFLOW_RUN_FILE} (MLflow was off when it started); starting a new MLflow run")
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        run_id, stored_uri = None, None
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-fA-F]{8,64}", run_id):
        warn(f"mlflow: {path} is damaged; starting a new MLflow run")
        return None
    if stored_uri != uri:
        warn(f"mlflow: this run was tracked at {stored_uri}, now {uri}; starting a new MLflow run there")
        return None
    try:
        client.get_run(run_id)
    except Exception:
        warn(f"mlflow: run {run_id} is gone from {uri}; starting a new MLflow run")
        return None
    return run_id


def _last_step(client, run_id: str, key: str) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0 if key == "val_mAP" else -1)


def _experiment(client, name: str, uri: str, out_dir: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # in the default store, artifacts go beside the database (MLflow's own default is ./mlruns of the cwd)
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (out_dir.resolve() / "mlflow-artifacts" / _tag(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        found = client.get_experiment_by_name(name)  # another run created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def _experiment_name(recipe_toml: str, run_dir: Path) -> str:
    try:
        name = tomllib.loads(recipe_toml).get("name")
    except tomllib.TOMLDecodeError:
        name = None
    return name if isinstance(name, str) and name else run_dir.parent.name


def _unreachable(uri: str) -> str | None:
    """For an http(s) store, why a TCP connection fails (seconds, not MLflow's minutes of retries)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


class _quiet_store_setup:
    """MLflow and Alembic print INFO lines while they create a new SQLite store; keep the
    training output to the training."""

    NAMES = ("mlflow.store.db.utils", "mlflow.store.db", "alembic", "alembic.runtime.migration")

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


# --------------------------------------------------------------------------- names and values

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_TAG = 200  # MLflow refuses metric names over 250 characters; "val_AP/" and a "_2" fit beside 200


def _tag(name: str) -> str:
    """A metric or tag name both backends accept: ASCII letters, digits, `_ . -` (others become `_`)."""
    tag = _UNSAFE.sub("_", str(name))
    return "_" + tag if not tag.strip(".") else tag


def _short_tag(name: str) -> str:
    """`_tag`, and a name longer than MAX_TAG cut to fit with a hash of the whole name (two long
    names that share a beginning stay apart)."""
    tag = _tag(name)
    if len(tag) <= MAX_TAG:
        return tag
    return f"{tag[:MAX_TAG - 9]}-{hashlib.sha1(str(name).encode()).hexdigest()[:8]}"


def _unique_tags(values: Mapping[str, float], seen: dict[str, str]) -> dict[str, float]:
    """Class names → safe tags of at most MAX_TAG characters (`_short_tag`), stable over the run;
    two names that clean to the same tag get `_2`, `_3`..."""
    out = {}
    for name, value in values.items():
        if name not in seen:
            base, n, used = _short_tag(name), 1, set(seen.values())
            tag = base
            while tag in used:
                n += 1
                tag = f"{base}_{n}"
            seen[name] = tag
        out[seen[name]] = value
    return out


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

