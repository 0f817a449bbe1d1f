"""Every arch trains at a small size in fp32 and bf16; the heads compute what the seed's did.

Sizes are chosen for a 2-core CPU: 64 px images (32 px for Swin-V2), batch 2, 5 classes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.models import ARCHS, arch_display, build_model, count_parameters, default_img_size
from aicoss_cli.models.backbones import CvtFeatures, InputRenorm
from aicoss_cli.models.ml_decoder import MLDecoder
from aicoss_cli.models.query2label import Query2Label

# swinv2 runs at 32 px and skips the bf16 backward (~5 s on 2 cores). cvt384_q2l (281 M
# parameters, 2 GB with gradients) runs on the meta device at its real 384 px; its code path
# is cvt_q2l's, which runs for real.
SMALL_SIZE = {"swinv2": 32}
NO_BF16_BACKWARD = {"swinv2"}
ON_META = {"cvt384_q2l"}
NUM_CLASSES = 5


def _train_step(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None, backward: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        with torch.set_grad_enabled(backward):
            logits = model(images)
    if backward:
        F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits, dtype=torch.float32)).backward()
    return logits


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - ON_META))
def test_arch_runs_forward_and_backward_in_fp32_and_bf16(arch):
    torch.manual_seed(0)
    size = SMALL_SIZE.get(arch, 64)
    model = build_model(arch, NUM_CLASSES, img_size=size)
    images = torch.randn(2, 3, size, size)

    logits = _train_step(model, images, None, backward=True)
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[:3]), "no gradient reached the backbone's first layers"

    logits16 = _train_step(model, images, torch.bfloat16, backward=arch not in NO_BF16_BACKWARD)
    assert logits16.shape == (2, NUM_CLASSES) and torch.isfinite(logits16.float()).all()


@pytest.mark.parametrize("arch", sorted(ON_META))
def test_large_arch_runs_forward_and_backward_on_meta(arch):
    size = default_img_size(arch)
    with torch.device("meta"):
        model = build_model(arch, NUM_CLASSES)
        images = torch.randn(2, 3, size, size)
        logits = model(images)
        assert logits.shape == (2, NUM_CLASSES)
        logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert model.to(torch.bfloat16)(images.to(torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------- ML-Decoder


def tiny_head(num_classes: int = 7, learnable: bool = False, features: int = 16) -> MLDecoder:
    return MLDecoder(num_classes, features, learnable_queries=learnable, dim=32, ffn_dim=64, num_heads=4)


def seed_ml_decoder(head: MLDecoder, features: torch.Tensor) -> torch.Tensor:
    """The seed's computation, sequence-first, with a per-query loop for the group FC."""
    core = head.decoder
    tokens = F.relu(core.embed_standart(features.flatten(2).transpose(1, 2))).transpose(0, 1)  # (N, B, D)
    tgt = core.query_embed.weight.unsqueeze(1).expand(-1, features.shape[0], -1)  # (Q, B, D)
    for layer in core.layers:
        tgt = layer.norm1(tgt + tgt)  # eval: dropout is the identity
        attn = layer.multihead_attn
        attended, _ = F.multi_head_attention_forward(
            tgt, tokens, tokens, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias,
            None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False,
        )
        tgt = layer.norm2(tgt + attended)
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    h = tgt.transpose(0, 1)  # (B, Q, D)
    out = torch.stack([h[:, q, :] @ core.duplicate_pooling[q] for q in range(h.shape[1])], dim=1)
    return out.flatten(1)[:, : core.num_classes] + core.duplicate_pooling_bias


@pytest.mark.parametrize("num_classes", [7, 150])
def test_ml_decoder_matches_the_seeds_computation(num_classes):
    torch.manual_seed(0)
    head = tiny_head(num_classes).eval()
    nn.init.normal_(head.decoder.duplicate_pooling_bias)
    features = torch.randn(3, 16, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(features), seed_ml_decoder(head, features), rtol=1e-4, atol=1e-5)


def test_ml_decoder_uses_min_100_k_queries_and_group_fc_beyond():
    assert tiny_head(7).decoder.duplicate_pooling.shape == (7, 32, 1)
    wide = tiny_head(250).decoder
    assert wide.query_embed.weight.shape == (100, 32)
    assert wide.duplicate_pooling.shape == (100, 32, 3) and wide.duplicate_pooling_bias.shape == (250,)
    assert tiny_head(250)(torch.randn(2, 16, 3, 3)).shape == (2, 250)


def test_ml_decoder_accepts_token_sequences():
    head = tiny_head().eval()
    grid = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(head(grid), head(grid.flatten(2).transpose(1, 2)))


def test_fixed_ml_decoder_freezes_queries_and_learnable_trains_them():
    fixed, learnable = tiny_head(learnable=False), tiny_head(learnable=True)
    assert not fixed.decoder.query_embed.weight.requires_grad
    assert learnable.decoder.query_embed.weight.requires_grad
    def dropouts(head: MLDecoder) -> set[float]:
        layer = head.decoder.layers[0]
        return {m.p for m in layer.modules() if isinstance(m, nn.Dropout)} | {layer.multihead_attn.dropout}

    assert dropouts(fixed) == {0.1} and dropouts(learnable) == {0.5}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ml_decoder_runs_under_half_precision_autocast(dtype):
    head = tiny_head(150)
    with torch.autocast("cpu", dtype=dtype):
        logits = head(torch.randn(2, 16, 3, 3))
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(head.decoder.duplicate_pooling.grad).all()


def test_ml_decoder_compiles_as_one_graph():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward like
    # inductor does, without inductor's ~35 s of C++ compilation on a 2-core CPU.
    torch._dynamo.reset()
    head = tiny_head(150)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    features = torch.randn(2, 16, 3, 3)
    compiled(features).sum().backward()
    assert head.decoder.duplicate_pooling.grad is not None
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(features), head(features))


# ---------------------------------------------------------------- Query2Label


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_query2label_matches_the_seeds_sequence_first_transformer():
    torch.manual_seed(0)
    q2l = Query2Label(nn.Identity(), num_features=12, num_classes=5, hidden_dim=16, num_heads=4).eval()
    # The seed's layout: (sequence, batch, dim).
    seed_transformer = nn.Transformer(16, 4, 1, 2)
    seed_transformer.load_state_dict(q2l.transformer.state_dict())
    seed_transformer.eval()
    feature_map = torch.randn(3, 12, 4, 4)
    with torch.no_grad():
        h = q2l.conv(feature_map).flatten(2).permute(2, 0, 1)
        labels = q2l.label_emb.repeat(3, 1, 1).transpose(0, 1)
        out = seed_transformer(h, labels).transpose(0, 1).reshape(3, 5 * 16)
        torch.testing.assert_close(q2l(feature_map), q2l.classifier(out), rtol=1e-4, atol=1e-5)


def test_cvt_backbone_returns_the_seeds_hidden_states_2():
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)
    # transformers indexes its per-layer drop-path list by stage: stage i needs depth > i.
    config = CvtConfig(depth=[1, 2, 3], embed_dim=[8, 16, 24], num_heads=[1, 2, 3], num_labels=4)
    seed_backbone = CvtForImageClassification(config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = seed_backbone(images, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(CvtFeatures(seed_backbone.cvt)(images), expected)


# ---------------------------------------------------------------- registry


def test_unknown_arch_names_the_closest_valid_ones():
    with pytest.raises(UserError, match="tresnet_xl_mldecoder"):
        build_model("tresnet_xl_mldecodr", 60)
    with pytest.raises(UserError, match="unknown arch"):
        count_parameters("no_such_model")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_is_a_user_error(num_classes):
    with pytest.raises(UserError, match="num_classes"):
        build_model("tiny_convnet", num_classes)


def test_pretrained_must_be_bool_or_path():
    with pytest.raises(UserError, match="pretrained"):
        build_model("tiny_convnet", 3, pretrained=1)


def test_registry_metadata():
    assert default_img_size("tresnet_xl_mldecoder") == 224
    assert default_img_size("swinv2") == 256
    assert default_img_size("cvt384_q2l") == 384
    assert arch_display("tresnet_xl_learnable_mldecoder") == ("TResNet_XL", "Learnable_ML-Decoder")
    assert arch_display("cvt_q2l") == ("CvT_21", "Q2L")
    assert arch_display("resnet50") == ("ResNet50", "FCN")
    seed_names = {
        "resnet50", "resnet101", "resnet50_mldecoder", "tresnet_xl", "tresnet_xl_mldecoder",
        "tresnet_xl_learnable_mldecoder", "tresnet_l_learnable_mldecoder", "tresnetv2_l_mldecoder",
        "tresnetv2_l_learnable_mldecoder", "tresnet_xl_q2l", "swinv2", "cvt_q2l", "cvt384_q2l",
    }
    assert seed_names <= set(ARCHS)
    assert all(isinstance(d, str) and d and "\n" not in d for d in ARCHS.values())


def test_tiny_convnet_is_small_and_has_no_batch_norm():
    model = build_model("tiny_convnet", 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert 1_000 < count_parameters("tiny_convnet", 10) < 100_000


def test_input_renorm_maps_imagenet_statistics_to_the_backbones():
    renorm = InputRenorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = torch.rand(1, 3, 4, 4)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(renorm(imagenet), (pixels - 0.5) / 0.5)
    assert not renorm.state_dict()


def test_importing_the_registry_does_not_import_timm_or_transformers():
    code = "import sys, aicoss_cli.models; assert not {'timm', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
