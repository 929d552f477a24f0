"""The user-facing API: an image in, a typed segmentation result out.

`Predictor` owns the pre-processing (official or deploy mode), a runner that maps a normalised padded
batch to `pred_logits` / `pred_masks` (the eager PyTorch model, or an ONNX Runtime session), and the
semantic / panoptic / instance post-processing in original-image coordinates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mask2former.config import ModelConfig
from mask2former.data.image_io import load_image
from mask2former.data.preprocess import PreprocessedImage, pad_batch, preprocess
from mask2former.postprocess import InstanceResult, PanopticResult, SemanticResult, postprocess

TASKS = ("semantic", "instance", "panoptic")
Result = SemanticResult | PanopticResult | InstanceResult


@dataclass
class Prediction:
    """One image's result with the RGB image it was computed on (for pictures and writers)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, EXIF-oriented
    result: Result
    task: str


class TorchRunner:
    """Runs the eager model: (B, 3, Hp, Wp) float -> {"pred_logits", "pred_masks"} without aux outputs."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        from mask2former.speed import optimize_for_inference

        # Result-preserving inference rewrites (FrozenBN folded into the convolutions), in place: the runner
        # owns the model from here on, and a folded model no longer has the checkpoint's norm keys.
        self.model = optimize_for_inference(model).to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device, dtype=next(self.model.parameters()).dtype)
        outputs = self.model(images, return_aux=False)
        return {
            "pred_logits": outputs["pred_logits"].float().cpu(),
            "pred_masks": outputs["pred_masks"].float().cpu(),
        }


class Predictor:
    """Segment images with a model and its config.

    `runner(images (B, 3, Hp, Wp)) -> {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, Hp/4, Wp/4)}`.
    `trained` is False for a randomly initialised model: callers say so to the user.
    """

    def __init__(
        self,
        runner: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        config: ModelConfig,
        source: str = "",
        trained: bool = True,
    ):
        self.runner = runner
        self.config = config
        self.source = source
        self.trained = trained

    @property
    def model(self) -> torch.nn.Module | None:
        return getattr(self.runner, "model", None)

    def preprocess(self, image: np.ndarray) -> PreprocessedImage:
        """(H, W, 3) uint8 RGB -> normalised (1, 3, Hp, Wp) tensor with its sizes, by the config's mode."""
        cfg = self.config.input
        if cfg.mode == "deploy":
            if cfg.size is None:
                raise ValueError(f"model {self.config.name!r}: deploy pre-processing needs input.size")
            return preprocess(image, mode="deploy", size=tuple(cfg.size))
        return preprocess(
            image,
            mode="official",
            short_edge=cfg.short_edge,
            max_size=cfg.max_size,
            size_divisibility=cfg.size_divisibility,
        )

    def set_short_edge(self, short_edge: int, max_size: int | None = None) -> None:
        """Run the official pre-processing at another test-time scale.

        The shortest edge becomes `short_edge`; the longest is capped at `max_size`, by default the
        configured cap scaled by the same factor. Raises ValueError for a fixed-size (deploy) model.
        """
        cfg = self.config.input
        if cfg.mode != "official":
            raise ValueError(
                f"model {self.config.name!r} resizes every image to a fixed {cfg.size}; "
                "a short-edge size applies to official-mode pre-processing only"
            )
        if short_edge < 1 or (max_size is not None and max_size < 1):
            raise ValueError(f"short edge {short_edge} / max size {max_size}: must be at least 1")
        if max_size is None:
            max_size = max(short_edge, round(cfg.max_size * short_edge / cfg.short_edge))
        self.config.input = dataclasses.replace(cfg, short_edge=short_edge, max_size=max_size)

    def predict(self, image, task: str | None = None) -> Result:
        """Segment one image (path, PIL image or (H, W, 3) uint8 array) -> a typed result."""
        return self.predict_batch([image], task)[0].result

    def predict_batch(self, images: Sequence, task: str | None = None) -> list[Prediction]:
        """Segment several images in one padded batch; results equal those of one image at a time."""
        task = task or self.config.task
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        arrays = [load_image(image) for image in images]
        inputs = [self.preprocess(array) for array in arrays]
        batch = pad_batch([item.tensor for item in inputs], self.config.input.size_divisibility)
        outputs = self.runner(batch)
        padded_size = tuple(batch.shape[-2:])
        predictions = []
        for index, (array, item) in enumerate(zip(arrays, inputs, strict=True)):
            result = self._postprocess(outputs, index, padded_size, item, task)
            predictions.append(Prediction(image=array, result=result, task=task))
        return predictions

    def _postprocess(
        self,
        outputs: dict[str, torch.Tensor],
        index: int,
        padded_size: tuple[int, int],
        item: PreprocessedImage,
        task: str,
    ) -> Result:
        """Image `index` of the batch outputs -> its result at the original size (official semantics)."""
        cfg = self.config
        return postprocess(
            outputs,
            batch_index=index,
            task=task,
            padded_size=padded_size,
            image_size=tuple(item.image_size),
            original_size=tuple(item.original_size),
            # a panoptic model reports instances of thing classes only, as the official code does
            thing_classes=cfg.thing_classes if (task == "panoptic" or cfg.task == "panoptic") else None,
            object_mask_threshold=cfg.object_mask_threshold,
            overlap_threshold=cfg.overlap_threshold,
            top_k=cfg.test_topk,
            # the official semantic order differs when the model also does panoptic/instance inference
            semantic_before_inference=cfg.task != "semantic",
        )
