"""Start training from weights trained on other classes: load what fits, carry over the shared classes.

Only the class head (`class_embed`, a Linear(hidden, K+1)) depends on the classes. Its row k scores class
k, the last row scores "no object". Fine-tuning on a dataset with other classes keeps every other weight,
and in the class head keeps the rows of the classes both datasets name the same (matched by name, so a
reordered or partly shared class list still finds its rows) plus the no-object row; the rows of new
classes keep the target model's fresh initialisation. The architecture itself must be the same: another
backbone, width or number of queries is refused (those weights would not mean anything to the new model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mask2former.checkpoints.io import CheckpointError, load_state_dict_strict
from mask2former.config import ModelConfig

CLASS_HEAD = "sem_seg_head.predictor.class_embed"


@dataclass
class FinetuneReport:
    """What `load_for_finetuning` did with the class head (all names in the target's order)."""

    carried_over: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # classes of the source that the target lacks
    same_classes: bool = False

    def summary(self) -> str:
        """One line for the user."""
        if self.same_classes:
            return (
                f"initial weights: all loaded ({len(self.carried_over)} classes, the same as the dataset's)"
            )
        return (
            f"initial weights: everything loaded except the class head; class rows carried over for "
            f"{len(self.carried_over)} classes ({_names(self.carried_over)}), re-initialised for "
            f"{len(self.reinitialised)} ({_names(self.reinitialised)}); not in the dataset: "
            f"{len(self.dropped)} ({_names(self.dropped)})"
        )


def _names(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def architecture_difference(source: ModelConfig, target: ModelConfig) -> str | None:
    """None when the two configs build the same network apart from the class count; else what differs."""
    if source.backbone != target.backbone:
        return f"another backbone ({_backbone(source)} vs {_backbone(target)})"
    if source.decoder.num_queries != target.decoder.num_queries:
        return f"{source.decoder.num_queries} queries vs {target.decoder.num_queries}"
    if source.decoder != target.decoder:
        return "another transformer decoder size"
    if source.pixel_decoder != target.pixel_decoder:
        return "another pixel decoder size"
    return None


def _backbone(config: ModelConfig) -> str:
    bb = config.backbone
    if bb.kind == "resnet":
        return f"ResNet {tuple(bb.layers)} {bb.stem_channels}-{bb.res2_channels * 8}"
    return f"Swin d={bb.embed_dim} {tuple(bb.depths)}"


def adapt_class_head(
    source_state: dict[str, torch.Tensor],
    source_classes: list[str],
    fresh_state: dict[str, torch.Tensor],
    target_classes: list[str],
) -> tuple[dict[str, torch.Tensor], FinetuneReport]:
    """A new state dict: `source_state` with its class head rebuilt for `target_classes`.

    Rows of target classes that the source names are copied from the source; the no-object row too; the
    other rows come from `fresh_state` (the target model's own initialisation). Inputs are not modified.
    class_embed.weight: (K_source + 1, D) -> (K_target + 1, D); bias (K + 1,).
    """
    report = FinetuneReport()
    if list(source_classes) == list(target_classes):
        report.carried_over, report.same_classes = list(target_classes), True
        return dict(source_state), report
    state = dict(source_state)
    source_index = {name: k for k, name in enumerate(source_classes)}
    for suffix in ("weight", "bias"):
        key = f"{CLASS_HEAD}.{suffix}"
        if key not in source_state or key not in fresh_state:
            raise CheckpointError(f"the initial weights have no class head ({key})")
        source_rows, rows = source_state[key], fresh_state[key].detach().clone()
        if source_rows.shape[0] != len(source_classes) + 1:
            raise CheckpointError(
                f"the initial weights' class head has {source_rows.shape[0] - 1} classes but its config "
                f"names {len(source_classes)}"
            )
        for k, name in enumerate(target_classes):
            if name in source_index:
                rows[k] = source_rows[source_index[name]].to(rows.dtype)
        rows[-1] = source_rows[-1].to(rows.dtype)  # "no object" means the same in both
        state[key] = rows
    report.carried_over = [name for name in target_classes if name in source_index]
    report.reinitialised = [name for name in target_classes if name not in source_index]
    target_set = set(target_classes)
    report.dropped = [name for name in source_classes if name not in target_set]
    return state, report


def load_for_finetuning(
    model: torch.nn.Module,
    model_config: ModelConfig,
    source_state: dict[str, torch.Tensor],
    source_config: ModelConfig,
    source: str = "initial weights",
) -> FinetuneReport:
    """Load `source_state` (trained for `source_config`) into `model` (built for `model_config`), in place.

    Everything but the class head must fit exactly (CheckpointError otherwise, one line); the class head
    keeps the rows of the classes both configs name the same and re-initialises the others.
    """
    difference = architecture_difference(source_config, model_config)
    if difference is not None:
        raise CheckpointError(
            f"{source}: cannot fine-tune {source_config.name} into {model_config.name}: {difference}; "
            "use weights of the same architecture"
        )
    fresh = model.state_dict()
    state, report = adapt_class_head(source_state, source_config.class_names, fresh, model_config.class_names)
    load_state_dict_strict(model, state, source)
    return report
