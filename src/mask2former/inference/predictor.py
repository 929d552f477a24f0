"""The user-facing API: an image in, a typed segmentation result out.

`Predictor` owns the pre-processing (official or deploy mode), a runner that maps a normalised padded
batch to `pred_logits` / `pred_masks` (the eager PyTorch model, or an ONNX Runtime session), and the
semantic / panoptic / instance post-processing in original-image coordinates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from mask2former.config import ModelConfig
from mask2former.glibc import freed_memory_kept
from mask2former.inference.inputs import as_image_list, is_batch, to_rgb_list
from mask2former.inference.postprocess import PostprocessSettings, postprocess
from mask2former.inference.prediction import Prediction
from mask2former.inference.preprocess import PreprocessedImage, pad_batch, preprocess_for
from mask2former.results import Result

TASKS = ("semantic", "instance", "panoptic")
# Instances below this score are dropped by `predict` (as detectron2's demo); 0 keeps the official top-k list.
DEFAULT_SCORE_THRESHOLD = 0.5

__all__ = ["DEFAULT_SCORE_THRESHOLD", "TASKS", "Prediction", "Predictor", "TorchRunner"]


class TorchRunner:
    """Runs an eager model: (B, 3, Hp, Wp) float -> {"pred_logits", "pred_masks"} without aux outputs.

    `model` stays as the caller gave it (device, classes and state_dict keys alike, so it can still be
    saved, converted, exported or fine-tuned). Inference runs on a private copy on `device`, rewritten by
    `optimize_for_inference` when `optimize` (FrozenBN folded, oneDNN layers); the copy is made on first use
    and again whenever the model's tensors changed (reloaded, moved or trained in place). With
    `optimize=False` on the model's own device and dtype, the model itself runs (no copy).

    `dtype` ("fp32", "bf16", "fp16" or a torch.dtype; None: the model's own) is the precision of that copy:
    its weights are converted after the float32 FrozenBN folding, its inputs are cast to it, its outputs
    come back as float32 for the post-processing (see `inference.precision`, which also refuses a dtype the
    device would only emulate). The caller's model keeps its dtype.

    `reuse_memory` (CPU): have glibc keep freed memory for reuse, process-wide (`glibc.freed_memory_kept`:
    no page faults for the large maps of every image, ~15% of R50's time; the heap is not trimmed between
    forward passes, so the resident set stays near their peak). False leaves the allocator as it is (the
    server keeps its own).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        optimize: bool = True,
        dtype: str | torch.dtype | None = None,
        reuse_memory: bool = True,
    ):
        from mask2former.inference.precision import check_supported, resolve_dtype

        self.model = model
        self.device = torch.device(device)
        self.optimize = optimize
        self.reuse_memory = reuse_memory
        first = next(model.parameters(), None)
        own = first.dtype if first is not None and first.is_floating_point() else torch.float32
        self.dtype = resolve_dtype(dtype, default=own)
        check_supported(self.dtype, self.device)
        self._copy: torch.nn.Module | None = None
        self._copy_key: tuple | None = None

    def inference_model(self) -> torch.nn.Module:
        """The module inference runs: the caller's model, or the private (optimised) copy of it."""
        first = next(self.model.parameters(), None)
        as_is = first is None or (first.device == self.device and first.dtype == self.dtype)
        if not self.optimize and as_is:
            return self.model
        key = _tensor_key(self.model)
        if self._copy is None or self._copy_key != key:
            self._copy = None  # free the stale copy before making the new one
            # Outside inference mode: the copy's weights must stay ordinary tensors (oneDNN packing reads
            # their version counters), even when the caller runs us inside an inference_mode block.
            with torch.inference_mode(False):
                private = copy.deepcopy(self.model).requires_grad_(False).to(self.device).eval()
                if self.optimize:
                    from mask2former.inference.optimize import optimize_for_inference

                    # Fold in float32 (a half model's scale * weight would round twice), then convert.
                    private = optimize_for_inference(private.float())
                private = private.to(self.dtype)
            self._copy, self._copy_key = private, key
        return self._copy

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.inference_model()
        with torch.inference_mode(), self.allocator():
            return self._run(model, images)

    def allocator(self) -> contextlib.AbstractContextManager:
        """The malloc setting the forward pass runs under (see `reuse_memory`)."""
        return freed_memory_kept(self.reuse_memory and self.device.type == "cpu")

    def _run(self, model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device, dtype=self.dtype)
        if model.training:  # the caller's own model in training mode: evaluate it without changing its mode
            model.eval()
            try:
                outputs = model(images, return_aux=False)
            finally:
                model.train()
        else:
            outputs = model(images, return_aux=False)
        return {
            "pred_logits": outputs["pred_logits"].float().cpu(),
            "pred_masks": outputs["pred_masks"].float().cpu(),
        }


def _tensor_key(model: torch.nn.Module) -> tuple:
    """Identity of every parameter and buffer (storage and in-place version): changes when any is edited."""
    return tuple((t.data_ptr(), _version(t), t.device) for t in model.state_dict(keep_vars=True).values())


def _version(tensor: torch.Tensor) -> int:
    """In-place version of a tensor; inference tensors have none (they cannot be edited outside inference
    mode, so their storage alone identifies them)."""
    return -1 if tensor.is_inference() else tensor._version


class Predictor:
    """Segment images with a model and its config.

        predictor = mask2former.load()
        prediction = predictor("photo.jpg", task="panoptic")   # a Prediction (plot, save, to_coco, ...)
        predictions = predictor([path, pil_image, array, tensor], bgr=False)   # a list, batched

    Images: paths, PIL images, numpy arrays and torch tensors, uint8 or float (see inference/inputs.py for
    the rules); `bgr=True` for arrays in OpenCV's channel order.
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
        self.config = copy.deepcopy(config)  # set_short_edge edits it: never the caller's object
        self.source = source
        self.trained = trained

    @property
    def model(self) -> torch.nn.Module | None:
        return getattr(self.runner, "model", None)

    def preprocess(self, image: np.ndarray) -> PreprocessedImage:
        """(H, W, 3) uint8 RGB -> normalised (1, 3, Hp, Wp) tensor with its sizes, by the config's mode."""
        return preprocess_for(self.config.input, image)

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
        from mask2former import limits

        # The network input is at least short_edge x short_edge: refuse a size no machine can run.
        limits.INPUT_PIXELS.check(short_edge * short_edge, f"short edge {short_edge}")
        self.config.input = dataclasses.replace(cfg, short_edge=short_edge, max_size=max_size)

    def __call__(
        self,
        images,
        task: str | None = None,
        bgr: bool = False,
        batch_size: int = 8,
        **thresholds: float | None,
    ) -> Prediction | list[Prediction]:
        """One image -> a Prediction; a list / tuple / stacked (B, ...) array or tensor -> a list of them,
        run `batch_size` images per forward pass. `thresholds` as in `predict_batch`."""
        if not is_batch(images):
            return self.predict_batch([images], task, bgr, **thresholds)[0]
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        items = as_image_list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            out.extend(self.predict_batch(items[start : start + batch_size], task, bgr, **thresholds))
        return out

    def predict(
        self, image, task: str | None = None, bgr: bool = False, **thresholds: float | None
    ) -> Result:
        """Segment one image (any kind `predictor(...)` takes) -> the typed result (`prediction.result`)."""
        return self.predict_batch([image], task, bgr, **thresholds)[0].result

    def predict_batch(
        self,
        images,
        task: str | None = None,
        bgr: bool = False,
        *,
        score_threshold: float | None = DEFAULT_SCORE_THRESHOLD,
        object_mask_threshold: float | None = None,
        overlap_threshold: float | None = None,
    ) -> list[Prediction]:
        """Segment several images in one padded batch; results equal those of one image at a time.

        `score_threshold`: instances scoring below it are dropped (0 keeps the official unthresholded
        top-k, which evaluation uses). `object_mask_threshold` / `overlap_threshold`: panoptic query and
        overlap thresholds, None for the model config's (officially 0.8 / 0.8).
        """
        from mask2former.writers import meta_from_config

        task = task or self.config.task
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        overrides = {
            name: value
            for name, value in (
                ("score_threshold", score_threshold),
                ("object_mask_threshold", object_mask_threshold),
                ("overlap_threshold", overlap_threshold),
            )
            if value is not None
        }
        for name, value in overrides.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value}: must be between 0 and 1")
        items = as_image_list(images)
        if not items:
            return []
        arrays = to_rgb_list(items, bgr)
        inputs = [self.preprocess(array) for array in arrays]
        batch = pad_batch([item.tensor for item in inputs], self.config.input.size_divisibility)
        outputs = self.runner(batch)
        padded_size = tuple(batch.shape[-2:])
        settings = PostprocessSettings.from_config(self.config, task, **overrides)
        try:
            meta = meta_from_config(self.config)
        except ValueError:  # a config whose names, ids and colours disagree: generic names then
            meta = None
        return [
            Prediction(
                array, postprocess(outputs, index, task, settings, item.geometry(padded_size)), task, meta
            )
            for index, (array, item) in enumerate(zip(arrays, inputs, strict=True))
        ]
