"""MAEBackbone inside transformers detectors that take a `backbone_config`: forward, loss, backward (tiny, offline).

No training recipe: these pin the mechanics (the backbone's channels, feature maps and strides fit each detector's
neck, and the loss reaches the encoder). Built with `backbone_config=MAEBackboneConfig(...)`, no timm, no download.
"""

import pytest
import torch
import transformers as T

from maekit import MAEBackboneConfig
from tests.conftest import TINY

# One feature map (the last block) for the single-scale DETRs, three pyramid levels for the multi-scale ones, four
# for the mask classification models.
PLAIN = {}
THREE = dict(pyramid_scales=[2, 1, 0.5], pyramid_channels=32)
FOUR = dict(pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=32)
DETR_SIZES = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=5,
    num_labels=3,
)
RT_DETR_SIZES = dict(
    encoder_in_channels=[32, 32, 32],
    feat_strides=[4, 8, 16],
    decoder_in_channels=[32, 32, 32],
    d_model=32,
    encoder_hidden_dim=32,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    decoder_layers=2,
    num_queries=5,
    num_labels=3,
    num_denoising=2,
)
DAB_SIZES = {**{k: v for k, v in DETR_SIZES.items() if k != "d_model"}, "hidden_size": 32}
DEFORMABLE_SIZES = dict(DETR_SIZES, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2)
MASK2FORMER_SIZES = dict(
    feature_size=32,
    mask_feature_size=32,
    hidden_dim=32,
    encoder_feedforward_dim=64,
    dim_feedforward=64,
    encoder_layers=1,
    decoder_layers=2,
    num_attention_heads=2,
    num_queries=5,
    num_labels=3,
    common_stride=4,
    feature_strides=[2, 4, 8, 16],
    train_num_points=64,
)
MASKFORMER_SIZES = dict(
    fpn_feature_size=32,
    mask_feature_size=32,
    num_queries=5,
    num_labels=3,
    decoder_config=dict(
        model_type="detr",
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=5,
    ),
)

BOX_DETECTORS = {
    "detr": (T.DetrConfig, T.DetrForObjectDetection, PLAIN, dict(DETR_SIZES, use_timm_backbone=False)),
    "conditional_detr": (
        T.ConditionalDetrConfig,
        T.ConditionalDetrForObjectDetection,
        PLAIN,
        dict(DETR_SIZES, use_timm_backbone=False),
    ),
    "dab_detr": (T.DabDetrConfig, T.DabDetrForObjectDetection, PLAIN, dict(DAB_SIZES, use_timm_backbone=False)),
    "table_transformer": (
        T.TableTransformerConfig,
        T.TableTransformerForObjectDetection,
        PLAIN,
        dict(DETR_SIZES, use_timm_backbone=False),
    ),
    "deformable_detr": (
        T.DeformableDetrConfig,
        T.DeformableDetrForObjectDetection,
        THREE,
        dict(DEFORMABLE_SIZES, use_timm_backbone=False),
    ),
    "rt_detr": (T.RTDetrConfig, T.RTDetrForObjectDetection, THREE, RT_DETR_SIZES),
    "rt_detr_v2": (T.RTDetrV2Config, T.RTDetrV2ForObjectDetection, THREE, RT_DETR_SIZES),
    "d_fine": (T.DFineConfig, T.DFineForObjectDetection, THREE, RT_DETR_SIZES),
}
MASK_MODELS = {
    "mask2former": (T.Mask2FormerConfig, T.Mask2FormerForUniversalSegmentation, FOUR, MASK2FORMER_SIZES),
    "maskformer": (T.MaskFormerConfig, T.MaskFormerForInstanceSegmentation, FOUR, MASKFORMER_SIZES),
}


def _build(config_class, model_class, backbone, sizes):
    backbone_config = MAEBackboneConfig(**{**TINY, "image_size": 64, **backbone})
    return model_class(config_class(backbone_config=backbone_config, **sizes)).train()


def _assert_loss_reaches_the_encoder(model, loss):
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "mae.blocks.0." in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(BOX_DETECTORS))
def test_box_detector_forward_loss_backward(name):
    model = _build(*BOX_DETECTORS[name])
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    out = model(pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    # (batch, queries, classes) and (batch, queries, 4); RT-DETR and D-FINE add denoising queries while training
    assert out.logits.shape[0] == 2 and out.pred_boxes.shape[0] == 2 and out.pred_boxes.shape[-1] == 4
    _assert_loss_reaches_the_encoder(model, out.loss)


@pytest.mark.parametrize("name", list(MASK_MODELS))
def test_mask_classification_forward_loss_backward(name):
    model = _build(*MASK_MODELS[name])
    generator = torch.Generator().manual_seed(0)
    mask_labels = [
        torch.randint(0, 2, (2, 64, 64), generator=generator).float(),
        torch.randint(0, 2, (1, 64, 64), generator=generator).float(),
    ]
    out = model(
        pixel_values=torch.randn(2, 3, 64, 64),
        mask_labels=mask_labels,
        class_labels=[torch.tensor([0, 2]), torch.tensor([1])],
    )
    assert out.class_queries_logits.shape[:2] == (2, 5) and out.masks_queries_logits.shape[:2] == (2, 5)
    _assert_loss_reaches_the_encoder(model, out.loss)
