"""The model card (README.md) written next to a trained model, and pushing the output folder to the Hub.

One card writer for every task: a task describes its model in a `ModelCard` and `write_model_card` renders it. Pushing
is a side job of training: `HubPusher` checks access before training starts (a clear error then, not after hours of
training), and a push that fails later only warns, is retried at the next save and is reported at the end.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from huggingface_hub import HfApi

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "HubAccessError",
    "HubPusher",
    "ModelCard",
    "card_hyperparameters",
    "card_results",
    "card_title",
    "is_local_path",
    "public_dataset_name",
    "write_model_card",
]

logger = logging.getLogger(__name__)

# What `push_to_hub` leaves out of the output folder: checkpoints stay local.
IGNORE_PATTERNS = ["checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_local_path(name: str) -> bool:
    """Whether a dataset/model name is a local path rather than a Hub id (local paths are never published)."""
    return os.path.exists(name) or not _HUB_ID.match(name) or name.startswith((".", "~"))


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@dataclass
class ModelCard:
    """What a model card says about a trained model.

    Args:
        title (`str`): the card's title (the Hub repo id or the folder's name).
        summary (`str`): one paragraph (Markdown) on what the model is and how it was trained.
        usage (`str`): Python code that loads it.
        pipeline_tag (`str`): the Hub's task tag.
        tags (`list[str]`): Hub tags.
        results (`dict`): final metrics, shown as a table.
        hyperparameters (`dict`): training hyper-parameters, shown as a table (`None` values are left out).
        dataset_name (`str`, *optional*): Hub id of the training data (a local path is never published).
        images (`dict[str, str]`): section title -> (caption, PNG path relative to the card).
        license (`str`, *optional*): license of the weights (it depends on the training data: none is claimed unless
            given).
    """

    title: str
    summary: str
    usage: str
    pipeline_tag: str
    tags: list[str]
    results: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    dataset_name: str | None = None
    images: dict[str, tuple[str, str]] = field(default_factory=dict)
    license: str | None = None


def write_model_card(path: str | Path, card: ModelCard) -> Path:
    """Write `card` as a Hub model card (YAML metadata: library_name, pipeline_tag, tags, datasets) to `path`."""
    metadata: dict[str, Any] = {"library_name": "maekit", "tags": card.tags, "pipeline_tag": card.pipeline_tag}
    if card.license:
        metadata["license"] = card.license
    if card.dataset_name and not is_local_path(card.dataset_name):
        metadata["datasets"] = [card.dataset_name]
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {card.title}", "", card.summary]
    lines += ["", "## Usage", "", "```python", card.usage.strip(), "```", ""]
    for title, rows in (("Results", card.results), ("Training hyper-parameters", card.hyperparameters)):
        rows = {key: value for key, value in rows.items() if value is not None}
        if rows:
            lines += [f"## {title}", "", "| name | value |", "|---|---|"]
            lines += [f"| {key} | {_value(value)} |" for key, value in rows.items()] + [""]
    for title, (caption, image) in card.images.items():
        lines += [f"## {title}", "", caption, "", f"![{title}]({image})", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


class HubAccessError(RuntimeError):
    """The Hub repository cannot be written with the given credentials (raised before training starts)."""


class HubPusher:
    """Uploads an output folder (model, image processor, card, figures; not checkpoints) to one Hub repository.

    Args:
        output_dir (`Path`): the folder to upload.
        repo_id (`str`, *optional*): the repository (default: the folder's name, under the token's user).
        token (`str`, *optional*): Hub token (default: the logged-in one).
        private (`bool`, *optional*): create the repository as private.
    """

    def __init__(self, output_dir: Path, repo_id: str | None = None, token: str | None = None, private=None):
        self.output_dir = output_dir
        self.requested_repo_id = repo_id or output_dir.resolve().name
        self.token = token
        self.private = private
        self.repo_id: str | None = None  # resolved by `check_access`
        self.failures: list[str] = []

    def check_access(self) -> str:
        """Create (or find) the repository and return its id; `HubAccessError` with what to do if that fails."""
        try:
            api = HfApi(token=self.token)
            self.repo_id = api.create_repo(self.requested_repo_id, private=self.private, exist_ok=True).repo_id
        except Exception as err:  # network, auth, permissions: all mean "cannot push", said before training
            raise HubAccessError(
                f"push_to_hub: cannot create or access the Hub repository {self.requested_repo_id!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). Log in with "
                "`hf auth login` (or pass hub_token), check hub_model_id and your network, or train without "
                "push_to_hub and upload output_dir later."
            ) from err
        return self.repo_id

    def push(self, commit_message: str) -> bool:
        """Upload the folder; on failure log one warning (no traceback) and return False."""
        try:
            if self.repo_id is None:
                self.check_access()
            HfApi(token=self.token).upload_folder(
                repo_id=self.repo_id,
                folder_path=str(self.output_dir),
                commit_message=commit_message,
                ignore_patterns=IGNORE_PATTERNS,
            )
            return True
        except Exception as err:  # a push is a side job: training goes on
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.failures.append(f"{commit_message}: {type(err).__name__}: {first_line}")
            logger.warning(f"Pushing to the Hub failed ({commit_message}): {type(err).__name__}: {first_line}")
            return False

    def how_to_push(self) -> str:
        """The command that uploads the output folder by hand."""
        return f"hf upload {self.repo_id or self.requested_repo_id} {self.output_dir} --exclude 'checkpoint-*'"


# ----------------------------------------------------------------------------------------------------------------------
# What the trainer publishes: the card's common fields, and pushing as a side job of a run


def card_title(trainer: Trainer) -> str:
    """The model card's title: the Hub repo id, else the output folder's name."""
    return trainer.args.hub_model_id or trainer.output_dir.resolve().name


def public_dataset_name(trainer: Trainer) -> str | None:
    """The trainer's `dataset_name` if it is a Hub id (a local path is never published)."""
    name = trainer.dataset_name
    return name if name and not is_local_path(name) else None


def card_results(trainer: Trainer) -> dict[str, Any]:
    """The card's results: the step reached, the last summary metrics and the best model's step (when one is kept)."""
    results = {"global_step": trainer.state.global_step, **trainer.last_metrics()}
    if trainer.state.best_step is not None:
        results["best_step"] = trainer.state.best_step
    return results


def card_hyperparameters(trainer: Trainer) -> dict[str, Any]:
    """The loop's hyper-parameters for the card (tasks add their own)."""
    args, spe = trainer.args, trainer.steps_per_epoch
    return {
        "learning_rate": trainer.learning_rate,
        "global_batch_size": trainer.global_batch_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": trainer.accelerator.num_processes,
        "total_steps": trainer.total_steps,
        "warmup_steps": args.resolved_warmup_steps(spe),
        "epochs": None if trainer.streaming else trainer.total_steps / spe,
        "lr_schedule": args.lr_schedule,
        "lr_poly_power": args.lr_poly_power if args.lr_schedule == "poly" else None,
        "min_lr": args.min_lr,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "seed": args.seed,
    }


def check_hub_access(trainer: Trainer) -> None:
    """`HubPusher.check_access` on the main process before training; its error is raised on every process."""
    accelerator, error = trainer.accelerator, None
    if accelerator.is_main_process:
        try:
            trainer.hub.check_access()
        except Exception as err:
            error = err
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise HubAccessError("push_to_hub: the main process cannot access the Hub repository (see its error).")


def _write_card(trainer: Trainer) -> None:
    try:
        trainer.create_model_card()
    except Exception as err:  # a side job: the trained model is what matters
        trainer.warn(f"Could not write the model card: {type(err).__name__}: {err}")


def push_snapshot(trainer: Trainer, step: int) -> None:
    """`hub_strategy="every_save"`: the current model and card into `output_dir`, then a push that only warns."""
    trainer.save_model(trainer.output_dir)
    if trainer.accelerator.is_main_process:
        _write_card(trainer)
        trainer.hub.push(f"Training in progress, step {step}")
    trainer.accelerator.wait_for_everyone()


def finish_outputs(trainer: Trainer) -> None:
    """The model card and the final push: side jobs that warn instead of failing the finished run."""
    if trainer.accelerator.is_main_process:
        _write_card(trainer)
        hub = trainer.hub
        if hub is not None and not hub.push("End of training"):
            logger.error(
                f"The model is saved in {trainer.output_dir}, but pushing it to the Hub failed ({len(hub.failures)} "
                f"failed push(es); last: {hub.failures[-1]}). Push it with: {hub.how_to_push()}"
            )
    trainer.accelerator.wait_for_everyone()  # no process leaves (or exits) while the main one is still writing
