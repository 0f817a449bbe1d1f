"""Which models the timm export takes."""

from __future__ import annotations

import pytest
import torch

from aicoss_cli.base.errors import UserError


def test_cvt_is_not_a_timm_model():
    from aicoss_cli.export.timm_weights import timm_parts
    from aicoss_cli.models import build_model

    with torch.device("meta"):
        model = build_model("cvt_q2l", 3)
    with pytest.raises(UserError, match=r"cvt_q2l: its backbone \(CvtFeatures, Hugging Face transformers\) is not a "
                                        r"timm model.*--format onnx"):
        timm_parts(model, "cvt_q2l")
