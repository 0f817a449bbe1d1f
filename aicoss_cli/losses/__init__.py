"""Multi-label losses of the seed, by name: `build_loss(name, **params)(logits, targets)`.

    from aicoss_cli.losses import build_loss
    loss = build_loss("partial_selective", gamma_neg=4)      # any accepted spelling
    value = loss(logits, targets)                            # (N, K) each; target -1 = not annotated

`functional` holds the math (pure functions with the formulas), `modules` the `nn.Module`s,
`params` one parameter model per loss (the recipe's [loss] section is built from them), and
`registry` the names, spellings and `build_loss`.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "functional": ["asymmetric_loss", "bce_loss", "partial_selective_loss", "selective_unannotated_weights",
                   "two_way_loss", "zlpr_loss"],
    "modules": ["AsymmetricLoss", "BCELogitLoss", "PartialSelectiveLoss", "TwoWayLoss", "ZLPRLoss"],
    "params": ["AsymmetricParams", "LossParams", "NoParams", "PartialSelectiveParams", "TwoWayParams"],
    "registry": ["LOSSES", "LOSS_CLASSES", "build_loss", "loss_param_defaults", "loss_param_fields",
                 "per_image_loss", "resolve_loss_name"],
})
