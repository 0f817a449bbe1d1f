"""Recipes: one TOML file = one model row. Pydantic models are the format's documentation.

A recipe has the sections `[model] [loss] [optim] [augment] [data] [runtime]`, and optionally
`[distill]` (learn an ensemble's outputs too, `train.distill`); every key is checked (unknown
keys, types, ranges) before any compute is spent, and errors name the file, the key, the value
and what was expected. The [loss] parameters come from the loss registry's parameter models
(`aicoss_cli.losses`), so importing this module imports torch.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.registry import loss_param_fields
from aicoss_cli.models.checkpoint import IMG_SIZE_MAX, IMG_SIZE_MIN


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """[model]: which architecture, which initial weights, which input size."""

    arch: str = Field(description="architecture name (see `aicoss count-params`)")
    pretrained: bool | str = Field(
        False, description='ImageNet weights: true (download), false (random init) or "path/to/weights"'
    )
    img_size: int | None = Field(None, ge=IMG_SIZE_MIN, le=IMG_SIZE_MAX,
                                 description="input side in pixels; default: the arch's")


class _LossSection(_Section):
    """[loss]: the loss by name; unset parameters take the loss's own defaults."""

    name: str = Field("bce", description="zlpr | two_way | partial_selective | asl | bce (seed spellings accepted)")

    @field_validator("prior", check_fields=False)
    @classmethod
    def _prior_source(cls, value: bool | str) -> bool | str:
        if value is True:
            raise ValueError('true is ambiguous: use "labels", "predictions" or a path to a prior CSV')
        if isinstance(value, str) and not value.strip():
            raise ValueError('an empty string is not a prior source: use false, "labels", "predictions" or a path')
        return value

    def params(self) -> dict[str, Any]:
        """The loss parameters that are set (not None), without the name and the prior source."""
        return {k: v for k, v in self.model_dump(exclude={"name", "prior"}).items() if v is not None}


def _loss_section() -> type[_LossSection]:
    """[loss] accepts every parameter of every loss (`losses.params.LossParams` models: the one
    declaration of each, with its range and description), unset by default; which of them apply
    to the chosen loss is checked by `check_recipe_names`."""
    fields = {}
    for key, info in loss_param_fields().items():
        kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        fields[key] = (kind | None, Field(None, description=info.description))
    fields["prior"] = (bool | str, Field(False, description='class prior: false | "labels" | "predictions" | '
                                                            '"path/to/prior.csv"'))
    return create_model("LossConfig", __base__=_LossSection, **fields)


LossConfig = _loss_section()


class OptimConfig(_Section):
    """[optim]: AdamW with cosine annealing, stepped per epoch as the seed did."""

    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="images per optimizer step, summed over all GPUs")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine schedule")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear warm-up (per step) before the cosine")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights with this decay "
                                    "(e.g. 0.9997; timm's ModelEmaV3), evaluated beside the raw weights; unset = off")
    ema_warmup: bool = Field(False, description="ramp the EMA decay up from 0 (timm's warm-up: "
                             "1 - (1 + step)^(-2/3), capped at ema_decay)")
    early_stop_patience: int | None = Field(None, ge=1, description="stop after N epochs without a better val mAP; "
                                            "unset = off")

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g})")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs}); "
                             "lower it, e.g. --set optim.warmup_epochs=0")
        if self.ema_warmup and self.ema_decay is None:
            raise ValueError("ema_warmup needs an EMA: set ema_decay (e.g. 0.9997), or ema_warmup = false")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accumulation ({self.grad_accumulation})"
            )
        return self


class AugmentConfig(_Section):
    """[augment]: weak = resize + Cutout + RandAugment; strong = resize + flips + Cutout + AutoAugment."""

    policy: Literal["weak", "strong", "none"] = Field("weak", description="training augmentation policy")
    magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (weak policy)")
    num_ops: int = Field(2, ge=0, le=10, description="RandAugment operations per image (weak policy)")
    cutout_factor: float = Field(0.5, ge=0, le=1, description="Cutout square side as a fraction of the image")


class DataConfig(_Section):
    """[data]: where the DACON-layout data lives and how train/val are split."""

    root: str = Field("data/aicoss", description="folder with train.csv, test.csv, sample_submission.csv")
    split: Literal["random", "stratified"] = Field("random", description="random (the seed's) or multi-label stratified")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of train.csv held out for validation")
    split_seed: int = Field(78, ge=0, lt=2**32, description="random_state of the split (the seed used 78); "
                            "0 <= split_seed < 2**32, as numpy and scikit-learn take it")
    exif_transpose: bool = Field(False, description="turn each image upright by its EXIF orientation (phone photos) "
                                 "in training and every prediction; false: the pixels as stored, as timm reads them")
    folds: int | None = Field(None, ge=2, description="K-fold cross-validation: K models, fold k validated on the "
                              "k-th of K multi-label stratified folds (seeded by split_seed; split and val_fraction "
                              "are not used); unset = one train/val split")
    fold: int | None = Field(None, ge=0, description="train this fold only (0-based; each fold's run sets it); unset "
                             "with folds = every fold")

    @model_validator(mode="after")
    def _one_fold_of_k(self) -> DataConfig:
        if self.fold is not None and self.folds is None:
            raise ValueError(f"fold = {self.fold} needs folds = K (the number of folds)")
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold = {self.fold}: a {self.folds}-fold cross-validation has folds 0 to {self.folds - 1}")
        return self


class RuntimeConfig(_Section):
    """[runtime]: device, precision and reproducibility."""

    seed: int = Field(41, ge=0, lt=2**32, description="seed of python, numpy and torch; 0 <= seed < 2**32")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="fp16 uses a grad scaler (CUDA only)")
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"')
    num_workers: int = Field(4, ge=0, description="data loader worker processes")
    channels_last: bool | Literal["auto"] = Field("auto", description='true, false or "auto" (channels_last memory format on CUDA only)')
    compile: bool = Field(False, description="torch.compile the model")
    deterministic: bool = Field(False, description="deterministic kernels (bit-exact resume; slower on GPU)")
    checkpoint_every: int | None = Field(None, ge=1, description="also save resumable state every N steps")
    sync_bn: bool = Field(False, description="synchronise batch-norm statistics across GPUs")
    eval_batch_size: int | None = Field(None, ge=1, description="batch size of validation/test passes")
    eval_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="precision of validation and the test pass, whatever the training precision (fp32: "
        "exact ranks for mAP)")
    keep: Literal["best", "last"] = Field("best", description="which checkpoint writes submission.csv and "
                                          "val_scores.csv, and which one `aicoss ensemble` takes from the run")
    keep_top: int | None = Field(None, ge=1, description="also keep the k best epochs' checkpoints "
                                 "(epoch03.safetensors, ...); unset = none")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description='experiment trackers: "tensorboard", "mlflow" (rank 0 logs)'
    )

    @field_validator("loggers", mode="before")
    @classmethod
    def _loggers(cls, value: Any) -> Any:
        if isinstance(value, str):  # --set runtime.loggers=tensorboard,mlflow
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            value = list(dict.fromkeys(value))  # each tracker once
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError('expected "auto", "cpu", "cuda" or "cuda:N"')


class DistillConfig(_Section):
    """[distill] (optional): learn an ensemble's probabilities as well as the labels (`aicoss distill`)."""

    teachers: list[str] = Field(min_length=1, description="checkpoint files, run folders (their kept checkpoint) "
                                "or ENSEMBLE.toml specs; the teacher is their weighted mean, as `aicoss ensemble` "
                                "computes it")
    weight: float = Field(0.9, ge=0, le=1, description="weight of the teacher term (BCE against the teacher's "
                          "probabilities); 1 - weight goes to the recipe's loss on the labels")
    mode: Literal["online", "cached"] = Field("online", description='"online": the teachers see every augmented '
                                              'batch; "cached": their outputs on the clean images, computed once')
    unlabeled: list[str] = Field(default_factory=list, description='images without labels that get the teacher term '
                                 'only: "test" (test.csv) and/or CSVs of img_id,img_path')

    @field_validator("teachers", "unlabeled", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        if isinstance(value, str):  # --set distill.unlabeled=test
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value


class Recipe(_Section):
    """One model row: what to train, on what, and how."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=120, description="run folder name")
    description: str = Field("", description="one line on what this row is")
    model: ModelConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    data: DataConfig = DataConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    distill: DistillConfig | None = Field(None, description="optional: distil an ensemble into this model")


SECTIONS = ("model", "loss", "optim", "augment", "data", "runtime")  # every recipe has them
OPTIONAL_SECTIONS = ("distill",)  # only a recipe that has the table; `aicoss tune` never searches them
ALL_SECTIONS = SECTIONS + OPTIONAL_SECTIONS


def section_model(section: str) -> type[_Section]:
    """The pydantic model of a section (an optional one's, not its `X | None`)."""
    return DistillConfig if section == "distill" else Recipe.model_fields[section].annotation  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_names: bool = True) -> Recipe:
    """Read, override and validate a recipe; raise UserError naming the file and key on any problem
    (or the `--set section.key=value` that set a bad value)."""
    path = Path(path)
    raw = read_toml(path, "recipe file not found (see `aicoss recipes` for the bundled ones)")
    set_by: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        set_by[_apply_override(raw, item)] = item
    blame = _Blame(str(path), set_by)
    recipe = validate_recipe(raw, source=str(path), blame=blame)
    if check_names:
        check_recipe_names(recipe, source=str(path), blame=blame)
    return recipe


class _Blame:
    """Who set the key an error is about: a `--set section.key=value`, or else the recipe file. An
    error about a whole section (keys that disagree) goes to the last --set in that section."""

    def __init__(self, source: str, set_by: dict[tuple[str, ...], str]):
        self.source, self.set_by = source, set_by

    def __call__(self, loc: tuple[str, ...]) -> str:
        if loc in self.set_by:
            return f"--set {self.set_by[loc]}"
        if len(loc) == 1:
            in_section = [item for key, item in self.set_by.items() if key[:1] == loc]
            if in_section:
                return f"--set {in_section[-1]}"
        return self.source


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """A TOML file as a dict; UserError naming the file if it is missing (`missing` says what
    it should have been), not UTF-8 or not valid TOML."""
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def validate_recipe(raw: dict[str, Any], source: str, blame=None) -> Recipe:
    """The recipe in `raw`; UserError naming `source` (or, through `blame`, the --set behind a key)."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc, blame or (lambda loc: source))) from None


def _describe(exc: ValidationError, blame) -> str:
    by_key: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        by_key.setdefault(_field_loc(err["loc"]), []).append(err)
    parts = []
    for loc, errs in by_key.items():
        if len(errs) > 1 and all(e["type"] not in ("extra_forbidden", "missing") for e in errs):
            # a union (true | false | "path") reports once per member: say what the key accepts instead
            text = (f"{_key_name(list(loc))} has the wrong type (got {_show(errs[0].get('input'))}); "
                    f"expected {_field_description(loc)}")
        else:
            text = _describe_one(loc, errs[0])
        parts.append((blame(loc), text))
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    shown, last = [], None
    for who, text in parts[:3]:
        shown.append(text if who == last else f"{who}: {text}")
        last = who
    return "; ".join(shown) + more


def _field_loc(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The key a pydantic error is about: (section, key) or (key,); union member tags are dropped."""
    loc = tuple(str(p) for p in loc)
    depth = 2 if loc and loc[0] in ALL_SECTIONS else 1
    return loc[:depth]


def _describe_one(loc: tuple[str, ...], err: dict[str, Any]) -> str:
    where = _key_name(list(loc))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {where}{_suggest(list(loc))}"
    if kind == "missing":
        return f"{where} is required"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    if len(loc) == 1 and loc[0] in ALL_SECTIONS:
        return f"[{loc[0]}] {msg}"
    return f"{where} {msg} (got {_show(err.get('input'))})"


def _field_description(loc: tuple[str, ...]) -> str:
    model: Any = section_model(loc[0]) if len(loc) > 1 else Recipe
    field = model.model_fields.get(loc[-1])
    return field.description if field is not None and field.description else "another value"


def _key_name(loc: list[str]) -> str:
    if not loc:
        return "recipe"
    if loc[0] in ALL_SECTIONS and len(loc) > 1:
        return f"[{loc[0]}] {'.'.join(loc[1:])}"
    if loc[0] in ALL_SECTIONS:
        return f"section [{loc[0]}]"
    return f"key '{'.'.join(loc)}'"


def _suggest(loc: list[str]) -> str:
    model: type[BaseModel] = Recipe
    if len(loc) == 2 and loc[0] in ALL_SECTIONS:
        model = section_model(loc[0])
    names = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], names, n=2, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; valid keys: {', '.join(names)}"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)
    return text if len(text) < 60 else text[:57] + "..."


# --------------------------------------------------------------------------- --set overrides


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """`section.key=value`: the value is parsed with the field's type (TOML syntax or a bare string).
    Returns the key it set, e.g. ("optim", "lr")."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item}: expected section.key=value, e.g. --set optim.lr=1e-4")
    parts = key.split(".")
    if len(parts) == 1:
        model, field = Recipe, parts[0]
        if field in ALL_SECTIONS:
            raise UserError(f"--set {item}: '{field}' is a section; set one of its keys, e.g. {field}.<key>=...")
    elif len(parts) == 2 and parts[0] in ALL_SECTIONS:
        model, field = section_model(parts[0]), parts[1]
    else:
        raise UserError(f"--set {item}: unknown key '{key}'; keys look like section.key with a section in {', '.join(ALL_SECTIONS)}")
    if field not in model.model_fields:  # type: ignore[union-attr]
        close = difflib.get_close_matches(field, list(model.model_fields), n=2, cutoff=0.6)  # type: ignore[union-attr]
        hint = f"; did you mean {' or '.join(repr('.'.join(parts[:-1] + [c])) for c in close)}?" if close else ""
        raise UserError(f"--set {item}: unknown key '{key}'{hint}")
    value = _parse_value(model.model_fields[field].annotation, text.strip())  # type: ignore[union-attr]
    target = raw
    for p in parts[:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise UserError(f"--set {item}: '{p}' in the recipe is not a table")
    target[parts[-1]] = value
    return tuple(parts)


def _parse_value(annotation: Any, text: str) -> Any:
    candidates: list[Any] = []
    try:
        candidates.append(tomllib.loads(f"v = {text}")["v"])
    except tomllib.TOMLDecodeError:
        pass
    candidates.append(text)
    adapter = TypeAdapter(annotation)
    for strict in (True, False):  # lax mode second, e.g. "3" for a float
        for value in candidates:
            try:
                adapter.validate_python(value, strict=strict)
                return value
            except ValidationError:
                continue
    return candidates[0]  # let the recipe validation report it with the key's name


# --------------------------------------------------------------------------- names and resolution


def check_recipe_names(recipe: Recipe, source: str, blame=None) -> None:
    """Check the arch and loss names and the loss parameters (imports the registries, hence torch).
    Errors name `source`, or through `blame` the --set behind the key."""
    from aicoss_cli.losses.registry import loss_param_defaults, resolve_loss_name
    from aicoss_cli.models import ARCHS

    blame = blame or (lambda loc: source)
    if recipe.model.arch not in ARCHS:
        close = difflib.get_close_matches(recipe.model.arch, list(ARCHS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see `aicoss count-params`"
        raise UserError(f"{blame(('model', 'arch'))}: [model] arch unknown architecture {recipe.model.arch!r}{hint}")
    try:
        name = resolve_loss_name(recipe.loss.name)
    except UserError as exc:
        raise UserError(f"{blame(('loss', 'name'))}: {exc}") from None
    accepted = loss_param_defaults(name)
    for key in recipe.loss.params():
        if key not in accepted:
            raise UserError(
                f"{blame(('loss', key))}: [loss] {key} does not apply to loss {name!r} "
                f"(it accepts: {', '.join(accepted) or 'no parameters'})"
            )


def resolve_recipe(recipe: Recipe, data_root: str | None = None) -> Recipe:
    """Make every default explicit (canonical loss name and parameters, image size, data root)."""
    from aicoss_cli.losses.registry import loss_param_defaults, resolve_loss_name
    from aicoss_cli.models import default_img_size

    resolved = recipe.model_copy(deep=True)
    name = resolve_loss_name(recipe.loss.name)
    loss = {"name": name, **loss_param_defaults(name), **recipe.loss.params(), "prior": recipe.loss.prior}
    resolved.loss = LossConfig.model_validate({k: v for k, v in loss.items() if k in LossConfig.model_fields})
    if resolved.model.img_size is None:
        resolved.model.img_size = default_img_size(recipe.model.arch)
    if data_root is not None:
        resolved.data.root = str(data_root)
    return resolved


def recipe_to_toml(recipe: Recipe) -> str:
    """TOML text of a recipe (None values, i.e. unset optional keys, are left out), written by a
    TOML library: any string (quotes, emoji) comes back as it was."""
    import tomli_w

    data = recipe.model_dump()
    doc: dict[str, Any] = {"name": data["name"]}
    if data.get("description"):
        doc["description"] = data["description"]
    for section in ALL_SECTIONS:
        if data[section] is not None:  # an optional section the recipe does not have stays out
            doc[section] = {key: value for key, value in data[section].items() if value is not None}
    return tomli_w.dumps(doc)


def recipe_from_toml(text: str, source: str) -> Recipe:
    """Rebuild a recipe stored in a run directory or a checkpoint's metadata."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: stored recipe is not valid TOML: {exc}") from None
    return validate_recipe(raw, source)


def recipe_diff(old: Recipe, new: Recipe) -> list[str]:
    """Human-readable differences, e.g. "[optim] lr: 0.0003 -> 0.0001"."""
    a, b = old.model_dump(), new.model_dump()
    changes = []
    for key in ("name", "description"):
        if a[key] != b[key]:
            changes.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    for section in ALL_SECTIONS:
        if a[section] is None or b[section] is None:  # an optional section added or removed
            if a[section] != b[section]:
                changes.append(f"[{section}]: {a[section]!r} -> {b[section]!r}")
            continue
        for key in a[section]:
            if a[section][key] != b[section][key]:
                changes.append(f"[{section}] {key}: {a[section][key]!r} -> {b[section][key]!r}")
    return changes


def bundled_recipes() -> Path:
    """The recipes that ship with aicoss: aicoss_cli/recipes/ in an installed wheel, the top-level
    recipes/ in a source checkout (pyproject.toml maps the one into the other)."""
    here = Path(__file__).resolve().parent
    return next((f for f in (here / "recipes", here.parent / "recipes") if f.is_dir()), here / "recipes")


def find_recipe(recipe: Path) -> Path:
    """`recipe` itself when it exists; else a bare name (`tresnet_xl_pasl` or `tresnet_xl_pasl.toml`)
    is looked up among the bundled recipes. A path that exists nowhere is returned as given (the
    recipe loader then says it is not found)."""
    if recipe.exists() or recipe.name != str(recipe):
        return recipe
    bundled = bundled_recipes() / (recipe.name if recipe.suffix == ".toml" else f"{recipe.name}.toml")
    return bundled if bundled.is_file() else recipe
