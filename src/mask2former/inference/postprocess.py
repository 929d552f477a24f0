"""Inference post-processing: one image's class and mask logits -> semantic / panoptic / instance results.

Follows the official Mask2Former code (maskformer_model.py: semantic_inference, panoptic_inference,
instance_inference; detectron2's sem_seg_postprocess). Every result is in the coordinates of the original
image and uses contiguous class indices 0..K-1 (K = number of classes, index K of the logits is
"no object"); map them to dataset ids with the dataset's category ids when writing files.

Resizing every query's mask to a large original image is where the official code runs out of memory, so
mask logits are resized in chunks of queries, and panoptic / instance inference through `postprocess`
only resize the queries they can use (decided from the class scores alone, so the results are the same up
to float rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mask2former.results import InstanceResult, PanopticResult, PanopticSegment, SemanticResult

Size = tuple[int, int]
CHUNK = 16  # queries resized at a time: bounds peak memory at CHUNK x padded/original size floats
PIXELS_PER_STEP = 1 << 24  # ... and at 16M pixels per step (64 MB of float32) for large original images


def _check_pair(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.ndim != 2 or mask_logits.ndim != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"class_logits (Q, K+1) and mask_logits (Q, H, W) disagree: got {tuple(class_logits.shape)} "
            f"and {tuple(mask_logits.shape)}"
        )


def _bilinear(x: torch.Tensor, size: Size) -> torch.Tensor:
    """(N, h, w) -> (N, *size), bilinear with align_corners=False as everywhere in the official code."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def _to_padded_then_original(
    mask_logits: torch.Tensor, padded_size: Size, image_size: Size, original_size: Size
) -> torch.Tensor:
    """One chunk of (n, h4, w4) -> (n, H, W): upsample to the padded input, crop the image, resize."""
    padded = _bilinear(mask_logits.float(), padded_size)
    return _bilinear(padded[:, : image_size[0], : image_size[1]], original_size)


@torch.no_grad()
def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: Size,
    image_size: Size,
    original_size: Size,
    chunk_size: int = CHUNK,
) -> torch.Tensor:
    """Mask logits of the network input -> logits on the original image (detectron2 sem_seg_postprocess).

    mask_logits (Q, h4, w4) -> (Q, H, W) float32: bilinear to `padded_size` (Hp, Wp), crop to the resized
    image `image_size` (h, w), bilinear to `original_size` (H, W); `chunk_size` queries at a time (torch's
    kernel vectorises across queries, so chunking changes the values only by float rounding).
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits: expected (Q, h, w), got shape {tuple(mask_logits.shape)}")
    q = mask_logits.shape[0]
    out = torch.empty((q, *original_size), dtype=torch.float32, device=mask_logits.device)
    chunk_size = _queries_per_step(chunk_size, original_size)
    for begin in range(0, q, chunk_size):
        out[begin : begin + chunk_size] = _to_padded_then_original(
            mask_logits[begin : begin + chunk_size], padded_size, image_size, original_size
        )
    return out


def _class_probs(class_logits: torch.Tensor) -> torch.Tensor:
    """(Q, K+1) logits -> (Q, K) probabilities of the real classes (softmax over K+1, no-object dropped)."""
    return class_logits.float().softmax(-1)[:, :-1]


@torch.no_grad()
def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """class_logits (Q, K+1), mask_logits (Q, H, W) -> (K, H, W) scores sum_q p(c|q) * sigmoid(mask_q)."""
    _check_pair(class_logits, mask_logits)
    return torch.einsum("qc,qhw->chw", _class_probs(class_logits), mask_logits.float().sigmoid())


@torch.no_grad()
def semantic_postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: Size,
    image_size: Size,
    original_size: Size,
    postprocess_before_inference: bool = False,
    chunk_size: int = CHUNK,
) -> SemanticResult:
    """One image's outputs -> SemanticResult at the original size.

    class_logits (Q, K+1), mask_logits (Q, Hp/4, Wp/4). The official code first upsamples the mask
    logits to the padded input; then, for semantic-only models (postprocess_before_inference False, the
    default), it runs semantic inference at the padded size and resizes the (K, Hp, Wp) score map with
    sem_seg_postprocess; for models that also do panoptic / instance inference (True) it resizes every
    query's mask logits to the original size first. The sum over queries is accumulated `chunk_size`
    queries at a time, so neither order holds all Q upsampled masks in memory.
    """
    _check_pair(class_logits, mask_logits)
    probs = _class_probs(class_logits)
    scores = None
    chunk_size = _queries_per_step(chunk_size, original_size if postprocess_before_inference else padded_size)
    for begin in range(0, mask_logits.shape[0], chunk_size):
        chunk = mask_logits[begin : begin + chunk_size]
        if postprocess_before_inference:
            chunk = _to_padded_then_original(chunk, padded_size, image_size, original_size)
        else:
            chunk = _bilinear(chunk.float(), padded_size)
        part = torch.einsum("qc,qhw->chw", probs[begin : begin + chunk_size], chunk.sigmoid())
        scores = part if scores is None else scores.add_(part)
    if scores is None:  # no queries at all: nothing scores anywhere
        size = original_size if postprocess_before_inference else padded_size
        scores = torch.zeros((probs.shape[1], *size), device=mask_logits.device)
    if not postprocess_before_inference:
        scores = _bilinear(scores[:, : image_size[0], : image_size[1]], original_size)
    class_map = scores.argmax(0).to(torch.int32).cpu().numpy()
    return SemanticResult(class_map=class_map, scores=scores)


def _panoptic_keep(class_logits: torch.Tensor, object_mask_threshold: float) -> torch.Tensor:
    """(Q,) bool: queries whose best class is a real class with probability > object_mask_threshold."""
    scores, labels = class_logits.float().softmax(-1).max(-1)
    return (labels != class_logits.shape[-1] - 1) & (scores > object_mask_threshold)


@torch.no_grad()
def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_classes: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    chunk_size: int = CHUNK,
) -> PanopticResult:
    """class_logits (Q, K+1), mask_logits (Q, H, W) -> PanopticResult with an (H, W) id map.

    Official semantics: keep queries whose best class is not no-object with probability >
    object_mask_threshold; each pixel goes to the kept query maximising probability * sigmoid(mask); a
    query's segment is the pixels it owns where its own sigmoid >= 0.5. A query is dropped when it owns
    no pixel, its sigmoid >= 0.5 area is 0, its segment is empty, or owned area / (sigmoid >= 0.5 area)
    < overlap_threshold. Stuff queries of one class share the id of the first of them; things get an id
    each; ids count from 1 in query order. `thing_classes[c]` says whether class c is a thing.
    """
    _check_pair(class_logits, mask_logits)
    keep = torch.nonzero(_panoptic_keep(class_logits, object_mask_threshold)).flatten()
    return _panoptic_kept(
        class_logits[keep],
        lambda q: mask_logits[keep[q]],
        tuple(mask_logits.shape[-2:]),
        thing_classes,
        overlap_threshold,
        chunk_size,
    )


def _queries_per_step(chunk_size: int, size: Size) -> int:
    """Queries handled together at (H, W): at most chunk_size, and at most PIXELS_PER_STEP pixels in all."""
    return max(1, min(chunk_size, PIXELS_PER_STEP // max(1, size[0] * size[1])))


def _panoptic_kept(
    kept_logits: torch.Tensor,
    masks_of: Callable[[torch.Tensor], torch.Tensor],
    size: Size,
    thing_classes: Sequence[bool],
    overlap_threshold: float,
    chunk_size: int,
) -> PanopticResult:
    """Panoptic inference over the kept queries (class logits (n, K+1)); masks_of(indices) gives their
    (c, H, W) mask logits a few at a time, so memory holds a few full-size masks, never all n."""
    num_classes = kept_logits.shape[-1] - 1
    if len(thing_classes) != num_classes:
        raise ValueError(
            f"thing_classes: expected {num_classes} flags (one per class), got {len(thing_classes)}"
        )
    h, w = size
    n = kept_logits.shape[0]
    if n == 0:
        return PanopticResult(id_map=np.zeros((h, w), dtype=np.int32), segments=[])
    scores, classes = kept_logits.float().softmax(-1).max(-1)
    # Per pixel the owner (argmax of probability x sigmoid, the first query on ties as torch's argmax),
    # found step by step: a later query takes a pixel only with a strictly larger value.
    best = owner = owner_sigmoid = None
    mask_area: list[int] = []
    step = _queries_per_step(chunk_size, size)
    for begin in range(0, n, step):
        index = torch.arange(begin, min(n, begin + step), device=kept_logits.device)
        masks = masks_of(index).float().sigmoid()  # (c, H, W)
        mask_area += (masks >= 0.5).flatten(1).sum(1).tolist()
        weighted = scores[index, None, None] * masks
        local = weighted.argmax(0)
        value = weighted.gather(0, local[None])[0]
        sigmoid = masks.gather(0, local[None])[0]
        del masks, weighted
        if best is None:
            best, owner, owner_sigmoid = value, local + begin, sigmoid
        else:
            better = value > best
            best = torch.where(better, value, best)
            owner = torch.where(better, local + begin, owner)
            owner_sigmoid = torch.where(better, sigmoid, owner_sigmoid)
    del best
    in_own_mask = owner_sigmoid >= 0.5  # the owner's own sigmoid >= 0.5
    owned_area = torch.bincount(owner.flatten(), minlength=n).tolist()
    segment_area = torch.bincount(owner[in_own_mask], minlength=n).tolist()

    query_to_id = [0] * n  # 0: the query's pixels stay void
    segments: list[PanopticSegment] = []
    stuff_ids: dict[int, PanopticSegment] = {}
    for k in range(n):
        if owned_area[k] == 0 or mask_area[k] == 0 or segment_area[k] == 0:
            continue
        if owned_area[k] / mask_area[k] < overlap_threshold:
            continue
        category = int(classes[k])
        isthing = bool(thing_classes[category])
        if not isthing and category in stuff_ids:
            merged = stuff_ids[category]
            merged.area += segment_area[k]
            query_to_id[k] = merged.id
            continue
        segment = PanopticSegment(
            id=len(segments) + 1,
            category_id=category,
            isthing=isthing,
            score=float(scores[k]),
            area=segment_area[k],
        )
        segments.append(segment)
        if not isthing:
            stuff_ids[category] = segment
        query_to_id[k] = segment.id

    # Segments are disjoint (each pixel has one owner), so painting is a lookup of the owner's id.
    lookup = torch.tensor(query_to_id, dtype=torch.int32, device=owner.device)
    id_map = torch.where(in_own_mask, lookup[owner], torch.zeros((), dtype=torch.int32, device=owner.device))
    return PanopticResult(id_map=id_map.cpu().numpy().astype(np.int32, copy=False), segments=segments)


def _select_instances(
    class_logits: torch.Tensor, top_k: int, thing_classes: Sequence[bool] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs by class probability over Q x K, then (officially after top-k) things only.

    Returns (scores (N,), classes (N,) int64, queries (N,) int64), in decreasing class probability.
    """
    probs = _class_probs(class_logits)  # (Q, K)
    num_classes = probs.shape[1]
    top_k = min(int(top_k), probs.numel())
    scores, flat_index = probs.flatten().topk(top_k)
    classes, queries = flat_index % num_classes, flat_index // num_classes
    if thing_classes is not None:
        if len(thing_classes) != num_classes:
            raise ValueError(
                f"thing_classes: expected {num_classes} flags (one per class), got {len(thing_classes)}"
            )
        is_thing = torch.tensor([bool(t) for t in thing_classes], device=classes.device)[classes]
        scores, classes, queries = scores[is_thing], classes[is_thing], queries[is_thing]
    return scores, classes, queries


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float32 xyxy with exclusive max; all zero for empty masks."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    nonempty = rows.any(1)
    # argmax of a bool row finds its first True; on the flipped row, the last one.
    y1 = rows.to(torch.uint8).argmax(1)
    y2 = h - rows.flip(1).to(torch.uint8).argmax(1)
    x1 = cols.to(torch.uint8).argmax(1)
    x2 = w - cols.flip(1).to(torch.uint8).argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * nonempty[:, None]


def _instances(
    scores: torch.Tensor,
    classes: torch.Tensor,
    queries: torch.Tensor,
    size: Size,
    masks_of: Callable[[torch.Tensor], torch.Tensor],
    score_threshold: float,
    chunk_size: int,
) -> InstanceResult:
    """Binarise and score the selected queries' masks, fetching (n, H, W) logits with masks_of(query ids)."""
    unique, inverse = torch.unique(queries, return_inverse=True)
    u = unique.numel()
    binary = np.zeros((u, *size), dtype=bool)
    mask_scores = torch.zeros(u)
    boxes = torch.zeros((u, 4))
    chunk_size = _queries_per_step(chunk_size, size)
    for begin in range(0, u, chunk_size):
        logits = masks_of(unique[begin : begin + chunk_size]).float()
        chunk = logits > 0  # mask = logit > 0, i.e. sigmoid > 0.5
        # Mean sigmoid inside the mask; 1e-6 keeps empty masks at score 0 as in the official code.
        inside = (logits.sigmoid() * chunk).flatten(1).sum(1) / (chunk.flatten(1).sum(1) + 1e-6)
        mask_scores[begin : begin + chunk_size] = inside.cpu()
        boxes[begin : begin + chunk_size] = _boxes_from_masks(chunk).cpu()
        binary[begin : begin + chunk_size] = chunk.cpu().numpy()
    inverse = inverse.cpu()
    final = scores.cpu() * mask_scores[inverse]
    order = torch.argsort(final, descending=True, stable=True)
    order = order[final[order] >= score_threshold]
    rows = inverse[order].numpy()
    return InstanceResult(
        masks=binary[rows],
        classes=classes.cpu()[order].numpy().astype(np.int64),
        scores=final[order].numpy().astype(np.float32),
        boxes=boxes[inverse[order]].numpy().astype(np.float32),
    )


@torch.no_grad()
def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_classes: Sequence[bool] | None = None,
    top_k: int = 100,
    score_threshold: float = 0.0,
    chunk_size: int = CHUNK,
) -> InstanceResult:
    """class_logits (Q, K+1), mask_logits (Q, H, W) -> InstanceResult of at most top_k instances.

    Official semantics: the top_k (query, class) pairs by class probability over Q x K (a query may come
    back with several classes); with `thing_classes` (a model trained for panoptic), pairs of stuff classes
    are dropped after the top-k; mask = logit > 0; score = class probability x mean sigmoid inside the
    mask. Additions: boxes from the masks, results sorted by score, and pairs with score < score_threshold
    dropped (the default 0 drops nothing, as the official code).
    """
    _check_pair(class_logits, mask_logits)
    scores, classes, queries = _select_instances(class_logits, top_k, thing_classes)
    size = tuple(mask_logits.shape[-2:])
    return _instances(scores, classes, queries, size, lambda q: mask_logits[q], score_threshold, chunk_size)


TASKS = ("semantic", "panoptic", "instance")


@dataclass(frozen=True)
class PostprocessSettings:
    """How a model's raw outputs become results: the official thresholds and the thing/stuff split.

    `thing_classes`: one flag per class; panoptic needs it, instance keeps only things when it is given
    (the official behaviour of a panoptic model) and every class when None. `score_threshold` drops
    instances below it (0 keeps the official unthresholded list). `semantic_before_inference`: the
    official semantic path of a model that also does panoptic/instance inference (resize queries first).
    """

    thing_classes: tuple[bool, ...] | None = None
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    top_k: int = 100
    score_threshold: float = 0.0
    semantic_before_inference: bool = False
    chunk_size: int = CHUNK

    @classmethod
    def from_config(cls, config, task: str, **overrides) -> PostprocessSettings:
        """The settings a ModelConfig implies for `task`; `overrides` replace single fields."""
        panoptic = task == "panoptic" or config.task == "panoptic"
        settings = cls(
            thing_classes=tuple(config.thing_classes) if panoptic else None,
            object_mask_threshold=config.object_mask_threshold,
            overlap_threshold=config.overlap_threshold,
            top_k=config.test_topk,
            semantic_before_inference=config.task != "semantic",
        )
        return dataclasses.replace(settings, **overrides)


@dataclass(frozen=True)
class ImageGeometry:
    """Where one image sits in a padded batch: padded (Hp, Wp), resized image (h, w) at the top left of
    the padding, and the original (H, W) that results are returned at."""

    padded_size: Size
    image_size: Size
    original_size: Size


@torch.no_grad()
def postprocess(
    outputs: dict[str, torch.Tensor],
    batch_index: int,
    task: str,
    settings: PostprocessSettings,
    geometry: ImageGeometry | None = None,
) -> SemanticResult | PanopticResult | InstanceResult:
    """Image `batch_index` of a batch of model outputs -> its result at the original size.

    The one post-processing entry of every caller (predictor, export parity, benchmarks, server).
    outputs: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, Hp/4, Wp/4). Without `geometry` the image
    fills the padded size, 4x the mask size. Panoptic and instance resize only the queries they can use,
    `settings.chunk_size` at a time.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    class_logits = outputs["pred_logits"][batch_index]
    mask_logits = outputs["pred_masks"][batch_index]
    _check_pair(class_logits, mask_logits)
    if geometry is None:
        padded = (4 * mask_logits.shape[-2], 4 * mask_logits.shape[-1])
        geometry = ImageGeometry(padded, padded, padded)
    padded_size, image_size, original_size = geometry.padded_size, geometry.image_size, geometry.original_size
    chunk_size = settings.chunk_size

    def resize(queries: torch.Tensor) -> torch.Tensor:
        return resize_mask_logits(mask_logits[queries], padded_size, image_size, original_size, chunk_size)

    if task == "semantic":
        return semantic_postprocess(
            class_logits,
            mask_logits,
            padded_size,
            image_size,
            original_size,
            settings.semantic_before_inference,
            chunk_size,
        )
    thing_classes = settings.thing_classes
    if task == "panoptic":
        if thing_classes is None:
            raise ValueError("thing_classes: panoptic post-processing needs one thing/stuff flag per class")
        keep = torch.nonzero(_panoptic_keep(class_logits, settings.object_mask_threshold)).flatten()
        # Keeping depends on class scores only, so inference on the kept subset is the same computation;
        # the kept queries are resized a few at a time as inference needs them.
        return _panoptic_kept(
            class_logits[keep],
            lambda q: resize(keep[q]),
            original_size,
            thing_classes,
            settings.overlap_threshold,
            chunk_size,
        )
    scores, classes, queries = _select_instances(class_logits, settings.top_k, thing_classes)
    return _instances(scores, classes, queries, original_size, resize, settings.score_threshold, chunk_size)
