"""UperNet on an MAE backbone, built from a maekit (or transformers `vit_mae`) folder with its pretrained weights.

The model is transformers' own `UperNetForSemanticSegmentation` with an `MAEBackboneConfig` as `backbone_config`,
so a saved folder is a plain UperNet folder: `AutoModelForSemanticSegmentation.from_pretrained` loads it (after
`import maekit`, which registers the backbone) and `pipeline("image-segmentation")` runs it with the
`SegformerImageProcessor` that transformers registers for UperNet.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import SegformerImageProcessorPil, UperNetConfig, UperNetForSemanticSegmentation

from ..image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ..modeling_backbone import MAEBackbone

__all__ = ["segmentation_image_processor", "upernet_from_pretrained"]


def upernet_from_pretrained(
    pretrained_model_name_or_path: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    *,
    out_indices: Sequence[int] | None = None,
    pyramid_scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    pyramid_channels: int = 256,
    drop_path_rate: float | None = None,
    backbone_kwargs: dict | None = None,
    **upernet_kwargs,
) -> UperNetForSemanticSegmentation:
    """A `UperNetForSemanticSegmentation` whose MAE backbone carries the encoder weights of a pretrained folder.

    The decoder (and any classification head) of the folder is dropped; the feature pyramid and the UperNet heads are
    newly initialised.

    Args:
        pretrained_model_name_or_path (`str`): a maekit pretraining / encoder / classification folder or Hub repo, or
            a transformers `vit_mae` one.
        num_labels (`int`, *optional*): number of classes (or give `id2label`).
        id2label (`dict[int, str]`, *optional*): class names; saved in the config and used by the pipeline.
        out_indices (`Sequence[int]`, *optional*): backbone stages feeding the pyramid: one (ViTDet: every scale from
            it; default: the last block) or one per scale (BEiT / MAE's multi-level features, e.g. `[4, 6, 8, 12]`).
        pyramid_scales (`Sequence[float]`): ViTDet pyramid scales (strides p/4 ... 2p).
        pyramid_channels (`int`): channels of every pyramid level.
        drop_path_rate (`float`, *optional*): stochastic depth of the encoder (0.1 in the ADE20K recipe).
        backbone_kwargs (`dict`, *optional*): further `MAEBackbone.from_pretrained` arguments (`revision`, `token`,
            `attn_implementation`, config fields).
        **upernet_kwargs: `UperNetConfig` fields (`hidden_size`, `auxiliary_loss_weight`, `loss_ignore_index`, ...).

    Returns:
        The model, in train mode.
    """
    if num_labels is None and id2label is None:
        raise ValueError("Pass num_labels or id2label (the number of segmentation classes).")
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries.")
        upernet_kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    else:
        upernet_kwargs["num_labels"] = num_labels
    backbone_kwargs = dict(backbone_kwargs or {})
    backbone_kwargs.update(pyramid_scales=list(pyramid_scales), pyramid_channels=pyramid_channels)
    if out_indices is not None:
        backbone_kwargs["out_indices"] = list(out_indices)
    if drop_path_rate is not None:
        backbone_kwargs["drop_path_rate"] = drop_path_rate
    backbone = MAEBackbone.from_pretrained(pretrained_model_name_or_path, **backbone_kwargs)
    config = UperNetConfig(backbone_config=backbone.config, **upernet_kwargs)
    model = UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict())  # encoder from the folder, the pyramid as initialised
    model.config._name_or_path = str(pretrained_model_name_or_path)
    return model.to(next(backbone.parameters()).dtype).train()


def segmentation_image_processor(
    size: int | tuple[int, int] = 512,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    do_reduce_labels: bool = False,
) -> SegformerImageProcessorPil:
    """The image processor to save next to a segmentation model (what `pipeline("image-segmentation")` uses).

    transformers' UperNet processor (`SegformerImageProcessor`, PIL backend so no torchvision is needed): resize to
    `size` (bilinear), normalize with `image_mean` / `image_std` (ImageNet's, as MAE); its
    `post_process_semantic_segmentation` resizes the logits back to each image's size and takes the argmax.
    """
    height, width = (size, size) if isinstance(size, int) else size
    return SegformerImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_reduce_labels=do_reduce_labels,
    )
