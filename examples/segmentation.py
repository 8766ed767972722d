"""Fine-tune a UperNet on a (pretrained) MAE encoder for semantic segmentation, on one CPU or many GPUs.

    python examples/segmentation.py                                   # the offline demo: texture mosaics, CPU minutes
    python examples/segmentation.py --model_name_or_path outputs/mae-default      # the demo from a pretrained MAE
    accelerate launch examples/segmentation.py --model_name_or_path facebook/vit-mae-base \\
        --dataset_name <ADE20K, scene_parse_150 layout> --reduce_labels true --num_labels 150 \\
        --per_device_train_batch_size 2 --mixed_precision fp16        # 8 GPUs: the ADE20K recipe of the MAE paper
    python examples/segmentation.py --data_dir path/to/folder --num_labels 5 ...  # images/ + annotations/ pairs

Arguments: `maekit.training.segmentation_scripts.SegmentationModelArguments`, `SegmentationDataArguments` and every
`maekit.training.SegmentationTrainingArguments` field (`--help`). Defaults are the ADE20K recipe (AdamW 1e-4 at batch
16, layer decay 0.65, poly schedule, 160k iterations, 512² crops, sliding-window evaluation). Data: a Hub dataset
with image + label-map columns in the `scene_parse_150` layout (`--dataset_name`), or a local folder of image /
label-map pairs (`--data_dir`). Without either, the run is the offline demo: mosaics of the three texture
photographs that ship with scikit-image (brick, grass, gravel), each pixel labelled with the photograph it was cut
from, so the labels are exact by construction; a tiny model from scratch learns them in a few CPU minutes
(`SEGMENTATION_DEMO`). Arguments you pass always win. The best model (eval mean IoU) is saved in `output_dir/best`,
the last one in `output_dir`; both load with `AutoModelForSemanticSegmentation` and `pipeline("image-segmentation")`.
"""

from __future__ import annotations

import sys

from transformers import set_seed

from maekit.segmentation import SegmentationDataset
from maekit.training import SegmentationTrainer, SegmentationTrainingArguments
from maekit.training.scripts import demo_epilog, is_demo, parse_script_arguments, use_few_threads_for_tiny_models
from maekit.training.segmentation_scripts import SEGMENTATION_DEMO as DEMO_DEFAULTS
from maekit.training.segmentation_scripts import SegmentationDataArguments as DataArguments
from maekit.training.segmentation_scripts import SegmentationModelArguments as ModelArguments
from maekit.training.segmentation_scripts import (
    build_segmentation_model,
    load_segmentation_splits,
    segmentation_transforms,
)

__all__ = ["DEMO_DEFAULTS", "DataArguments", "ModelArguments", "main", "parse_arguments"]


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, SegmentationTrainingArguments]:
    """Defaults: the ADE20K recipe, then the demo's (no data arguments); what `argv` says wins."""
    arguments = (ModelArguments, DataArguments, SegmentationTrainingArguments)
    return parse_script_arguments(
        arguments, argv, DEMO_DEFAULTS, description=__doc__, epilog=demo_epilog(DEMO_DEFAULTS)
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    use_few_threads_for_tiny_models(is_demo(data_args))
    set_seed(training_args.seed)  # the model's initialisation
    train, evaluation, id2label = load_segmentation_splits(data_args, training_args.seed)
    model = build_segmentation_model(model_args, id2label, image_size=data_args.crop_size)
    transforms = segmentation_transforms(data_args, model.config.loss_ignore_index, model.config.num_labels)
    trainer = SegmentationTrainer(
        model,
        training_args,
        SegmentationDataset(train, transforms["train"], seed=training_args.seed),  # "image" / "annotation" columns
        eval_dataset=SegmentationDataset(evaluation, transforms["eval"]),
        image_processor=transforms["image_processor"],
        dataset_name=data_args.dataset_name,
    )
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        history = [entry for entry in trainer.state.log_history if "eval_mean_iou" in entry]
        first, last = history[0], history[-1]
        print(
            f"Done: {result.metrics}\nEval mean IoU {first['eval_mean_iou']:.1f}% at step {first['step']} -> "
            f"{last['eval_mean_iou']:.1f}% at step {last['step']}; best {trainer.state.best_metric:.1f}% at step "
            f"{trainer.state.best_step} in {training_args.output_dir}/best."
        )
    trainer.accelerator.end_training()  # trackers closed, process group torn down: every process exits cleanly
    return result.metrics


if __name__ == "__main__":
    main()
