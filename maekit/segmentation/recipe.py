"""The ADE20K fine-tuning recipe of the MAE paper (UperNet, ViT-B/16) as one read-only dict.

Sources: MAE paper, appendix A.4 ("We use UperNet following the semantic segmentation code of BEiT ... fine-tune
end-to-end ... batch size 16"; Table 4: ViT-B 48.1, ViT-L 53.6 mIoU) and mmsegmentation's
`configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py`, which reproduces 48.13 mIoU with these values
(BEiT's `upernet_beit_base_12_512_slide_160k_ade20k` setting with MAE's learning rate and layer decay).
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["ADE20K_RECIPE"]

ADE20K_RECIPE = MappingProxyType(
    {
        # data: scene_parse_150 layout, 150 classes after reduce_labels (0 = "other" -> ignored)
        "num_labels": 150,
        "reduce_labels": True,
        "ignore_index": 255,
        "crop_size": 512,
        "scale": (2048, 512),
        "ratio_range": (0.5, 2.0),
        "cat_max_ratio": 0.75,
        "flip_prob": 0.5,
        "photometric_distortion": True,
        # model: MAE ViT-B/16, features of blocks 4, 6, 8, 12 (BEiT's out_indices [3, 5, 7, 11]) at scales 4..1/2
        "out_indices": (4, 6, 8, 12),
        "pyramid_scales": (4.0, 2.0, 1.0, 0.5),
        "drop_path_rate": 0.1,
        "upernet_hidden_size": 768,
        "auxiliary_loss_weight": 0.4,
        # optimization: AdamW with layer-wise lr decay; no weight decay on biases, norms, cls token, position table
        "optimizer": "adamw",
        "learning_rate": 1e-4,
        "betas": (0.9, 0.999),
        "weight_decay": 0.05,
        "layer_decay": 0.65,
        "batch_size": 16,
        "max_steps": 160_000,
        # schedule (mmseg "poly" + linear warmup, per iteration): lr·(1 - step/max_steps)^power, multiplied during
        # warmup by 1 - (1 - step/warmup_steps)·(1 - warmup_ratio)
        "lr_schedule": "poly",
        "poly_power": 1.0,
        "min_lr": 0.0,
        "warmup_steps": 1500,
        "warmup_ratio": 1e-6,
        "mixed_precision": "fp16",
        # evaluation: keep-ratio resize to (2048, 512), sliding 512 windows with stride 341, single scale
        "eval_mode": "slide",
        "eval_crop_size": 512,
        "eval_stride": 341,
    }
)
