"""postprocess.py on hand-built logits with known answers, and against slow from-the-definition versions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mask2former.inference.postprocess import (
    ImageGeometry,
    PostprocessSettings,
    instance_inference,
    panoptic_inference,
    postprocess,
    resize_mask_logits,
    semantic_inference,
    semantic_postprocess,
)
from mask2former.results import InstanceResult, PanopticResult

BIG = 20.0  # a mask logit whose sigmoid is 1 to float32 precision


def class_logits_for(probs: list[list[float]]) -> torch.Tensor:
    """(Q, K+1) logits whose softmax is exactly the given rows (up to rounding)."""
    return torch.tensor(probs, dtype=torch.float64).clamp_min(1e-12).log().float()


def confident(num_queries: int, classes: list[int], num_classes: int, p: float = 0.95) -> torch.Tensor:
    rows = []
    for c in classes:
        row = [(1 - p) / num_classes] * (num_classes + 1)
        row[c] = p
        rows.append(row)
    assert len(rows) == num_queries
    return class_logits_for(rows)


# ---------------------------------------------------------------- panoptic, hand-built


def test_stuff_of_one_class_merges_into_one_id_and_things_get_one_each():
    # classes: 0 = sky (stuff), 1 = person (thing); four queries in four column bands of a 4 x 8 image
    masks = torch.full((4, 4, 8), -BIG)
    for q in range(4):
        masks[q, :, 2 * q : 2 * q + 2] = BIG
    result = panoptic_inference(confident(4, [0, 1, 0, 1], 2), masks, thing_classes=[False, True])
    ids = [s.id for s in result.segments]
    assert ids == [1, 2, 3]  # sky (first query), person, person; the second sky query reuses id 1
    assert [(s.category_id, s.isthing) for s in result.segments] == [(0, False), (1, True), (1, True)]
    expected = np.repeat(np.array([1, 2, 1, 3]), 2)[None].repeat(4, 0)
    np.testing.assert_array_equal(result.id_map, expected)
    assert result.id_map.dtype == np.int32
    assert [s.area for s in result.segments] == [16, 8, 8]
    assert result.segments[0].score == pytest.approx(0.95, abs=1e-5)


@pytest.mark.parametrize("p, kept", [(0.79, False), (0.81, True), (0.8, False)])
def test_object_mask_threshold_is_strict(p, kept):
    masks = torch.full((1, 3, 3), BIG)
    result = panoptic_inference(confident(1, [0], 2, p=p), masks, thing_classes=[True, True])
    assert (len(result.segments) == 1) == kept
    assert (result.id_map == 1).all() if kept else (result.id_map == 0).all()


def test_no_object_best_class_is_dropped_even_when_confident():
    logits = class_logits_for([[0.01, 0.01, 0.98]])  # no-object at 0.98
    result = panoptic_inference(logits, torch.full((1, 2, 2), BIG), [True, False])
    assert result.segments == [] and not result.id_map.any()


@pytest.mark.parametrize("covered, kept", [(19, True), (20, True), (21, False), (100, False)])
def test_overlap_threshold(covered, kept):
    # Query 1 (0.9) wants all 100 columns; query 0 (0.95) takes the first `covered` of them.
    # Query 1 keeps (100 - covered) / 100 of its mask: kept iff that ratio >= 0.8.
    masks = torch.full((2, 2, 100), BIG)
    masks[0, :, covered:] = -BIG
    logits = class_logits_for([[0.95, 0.025, 0.025], [0.025, 0.9, 0.075]])
    result = panoptic_inference(logits, masks, thing_classes=[True, True])
    assert [s.category_id for s in result.segments] == ([0, 1] if kept else [0])
    if not kept:  # the dropped query's pixels are void
        assert (result.id_map[:, covered:] == 0).all()


def test_query_fully_covered_by_a_stronger_one_is_dropped():
    masks = torch.full((2, 5, 5), -BIG)
    masks[0] = BIG
    masks[1, 1:4, 1:4] = BIG
    logits = class_logits_for([[0.95, 0.025, 0.025], [0.025, 0.9, 0.075]])
    result = panoptic_inference(logits, masks, [True, True])
    assert len(result.segments) == 1 and (result.id_map == 1).all()


def test_no_query_kept_gives_empty_results_with_right_shapes():
    logits = class_logits_for([[0.5, 0.3, 0.2]] * 3)
    masks = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(0))
    pan = panoptic_inference(logits, masks, [True, False])
    assert pan.segments == [] and pan.id_map.shape == (6, 7) and not pan.id_map.any()
    inst = instance_inference(logits, masks, thing_classes=[False, False])
    assert inst.masks.shape == (0, 6, 7) and inst.masks.dtype == bool
    assert inst.classes.shape == (0,) and inst.classes.dtype == np.int64
    assert inst.scores.shape == (0,) and inst.scores.dtype == np.float32
    assert inst.boxes.shape == (0, 4) and inst.boxes.dtype == np.float32


def slow_panoptic(class_logits, mask_logits, thing_classes, threshold, overlap):
    """The official algorithm written pixel by pixel with Python loops."""
    probs = class_logits.softmax(-1)
    num_classes = class_logits.shape[1] - 1
    kept = [
        q
        for q in range(probs.shape[0])
        if int(probs[q].argmax()) != num_classes and float(probs[q].max()) > threshold
    ]
    sig = mask_logits.sigmoid()
    h, w = sig.shape[1:]
    id_map = np.zeros((h, w), dtype=np.int32)
    if not kept:
        return id_map, []
    weighted = (probs.max(-1).values[:, None, None] * sig).tolist()
    sig_list = sig.tolist()
    owner = [[max(kept, key=lambda q, y=y, x=x: (weighted[q][y][x], -q)) for x in range(w)] for y in range(h)]
    segments, next_id, stuff = [], 0, {}
    for q in kept:
        owned = sum(owner[y][x] == q for y in range(h) for x in range(w))
        own = sum(sig_list[q][y][x] >= 0.5 for y in range(h) for x in range(w))
        pixels = [(y, x) for y in range(h) for x in range(w) if owner[y][x] == q and sig_list[q][y][x] >= 0.5]
        if owned == 0 or own == 0 or not pixels or owned / own < overlap:
            continue
        c = int(probs[q].argmax())
        if not thing_classes[c] and c in stuff:
            seg_id = stuff[c]
        else:
            next_id += 1
            seg_id = next_id
            segments.append((seg_id, c, bool(thing_classes[c])))
            if not thing_classes[c]:
                stuff[c] = seg_id
        for y, x in pixels:
            id_map[y, x] = seg_id
    return id_map, segments


@pytest.mark.parametrize("seed", range(40))
def test_panoptic_matches_slow_definition_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 8, 4, 5, 6
    class_logits = torch.randn(q, k + 1, generator=g) * 4
    mask_logits = torch.randn(q, h, w, generator=g) * 3
    thing_classes = [bool(t) for t in torch.rand(k, generator=g) < 0.5]
    threshold = [0.8, 0.5, 0.3][seed % 3]
    overlap = [0.8, 0.5, 0.2][seed % 3]
    result = panoptic_inference(class_logits, mask_logits, thing_classes, threshold, overlap)
    id_map, segments = slow_panoptic(class_logits, mask_logits, thing_classes, threshold, overlap)
    np.testing.assert_array_equal(result.id_map, id_map)
    assert [(s.id, s.category_id, s.isthing) for s in result.segments] == segments
    assert [s.area for s in result.segments] == [int((id_map == s[0]).sum()) for s in segments]


# ---------------------------------------------------------------- instance


def test_instance_top_k_returns_one_query_with_several_classes():
    logits = class_logits_for([[0.45, 0.44, 0.01, 0.10], [0.3, 0.1, 0.2, 0.4], [0.1, 0.1, 0.1, 0.7]])
    masks = torch.full((3, 4, 6), -BIG)
    masks[0, 1:3, 2:5] = 3.0
    result = instance_inference(logits, masks, top_k=2)
    assert result.classes.tolist() == [0, 1]
    assert result.masks.shape == (2, 4, 6)
    np.testing.assert_array_equal(result.masks[0], result.masks[1])
    mean_sigmoid = 1 / (1 + math.exp(-3.0)) * 6 / (6 + 1e-6)
    np.testing.assert_allclose(result.scores, [0.45 * mean_sigmoid, 0.44 * mean_sigmoid], rtol=1e-5)
    np.testing.assert_array_equal(result.boxes, [[2, 1, 5, 3]] * 2)  # exclusive max


def test_instance_thing_filter_applies_after_top_k():
    # best pairs: (q0, stuff 0) 0.9, (q1, thing 1) 0.8, (q2, thing 1) 0.7; top-2 then things -> only q1
    logits = class_logits_for([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    masks = torch.full((3, 3, 3), BIG)
    result = instance_inference(logits, masks, thing_classes=[False, True], top_k=2)
    assert result.classes.tolist() == [1]
    assert result.scores[0] == pytest.approx(0.8, rel=1e-5)


def test_instance_empty_mask_scores_zero_with_zero_box_and_threshold_filters():
    logits = class_logits_for([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    masks = torch.full((2, 3, 4), BIG)
    masks[1] = -BIG
    result = instance_inference(logits, masks, top_k=2)
    assert result.classes.tolist() == [0, 1] and result.scores[1] == 0.0
    np.testing.assert_array_equal(result.boxes, [[0, 0, 4, 3], [0, 0, 0, 0]])
    filtered = instance_inference(logits, masks, top_k=2, score_threshold=0.5)
    assert filtered.classes.tolist() == [0]


def test_instance_matches_official_formula_on_random_logits():
    g = torch.Generator().manual_seed(3)
    class_logits, mask_logits = torch.randn(10, 6, generator=g) * 2, torch.randn(10, 7, 9, generator=g)
    result = instance_inference(class_logits, mask_logits, top_k=15, chunk_size=4)
    probs = class_logits.softmax(-1)[:, :-1]
    expected = []
    for flat in probs.flatten().topk(15).indices.tolist():
        q, c = divmod(flat, 5)
        binary = mask_logits[q] > 0
        mean = float((mask_logits[q].sigmoid() * binary).sum() / (binary.sum() + 1e-6))
        expected.append((float(probs[q, c]) * mean, c, q))
    expected.sort(key=lambda t: -t[0])
    np.testing.assert_allclose(result.scores, [e[0] for e in expected], rtol=1e-5)
    assert result.classes.tolist() == [e[1] for e in expected]
    for mask, box, (_, _, q) in zip(result.masks, result.boxes, expected, strict=True):
        np.testing.assert_array_equal(mask, (mask_logits[q] > 0).numpy())
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


# ---------------------------------------------------------------- semantic and resizing


def test_semantic_inference_and_argmax_match_a_loop_over_the_definition():
    g = torch.Generator().manual_seed(1)
    class_logits, mask_logits = torch.randn(5, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    scores = semantic_inference(class_logits, mask_logits)
    probs, sig = class_logits.softmax(-1), mask_logits.sigmoid()
    for c in range(3):
        for y in range(3):
            for x in range(4):
                expected = sum(float(probs[q, c]) * float(sig[q, y, x]) for q in range(5))
                assert float(scores[c, y, x]) == pytest.approx(expected, rel=1e-5)
    result = semantic_postprocess(class_logits, mask_logits, (3, 4), (3, 4), (3, 4))
    np.testing.assert_array_equal(result.class_map, scores.argmax(0).numpy())
    assert result.class_map.dtype == np.int32 and result.scores.shape == (3, 3, 4)


def direct_chain(x, padded, image, original):
    """detectron2 order written out: one interpolate to the padded size, crop, one to the original size."""
    up = F.interpolate(x[None], size=padded, mode="bilinear", align_corners=False)[0]
    up = up[:, : image[0], : image[1]]
    return F.interpolate(up[None], size=original, mode="bilinear", align_corners=False)[0]


def test_resize_chain_matches_direct_two_step_interpolation_in_chunks():
    x = torch.randn(7, 8, 12, generator=torch.Generator().manual_seed(2))
    out = resize_mask_logits(x, (32, 48), (29, 40), (58, 81), chunk_size=3)
    assert out.shape == (7, 58, 81) and out.dtype == torch.float32
    # Chunks change only float rounding: torch's bilinear kernel vectorises across channels.
    torch.testing.assert_close(out, direct_chain(x, (32, 48), (29, 40), (58, 81)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("before", [False, True])
def test_semantic_postprocess_follows_the_official_order(before):
    g = torch.Generator().manual_seed(4)
    class_logits, mask_logits = torch.randn(6, 5, generator=g), torch.randn(6, 4, 6, generator=g) * 3
    sizes = ((16, 24), (14, 21), (30, 44))
    result = semantic_postprocess(
        class_logits, mask_logits, *sizes, postprocess_before_inference=before, chunk_size=4
    )
    if before:  # every query resized to the original size, then inference
        expected = semantic_inference(class_logits, direct_chain(mask_logits, *sizes))
    else:  # inference on masks upsampled to the padded input, then the score map cropped and resized
        up = F.interpolate(mask_logits[None], size=sizes[0], mode="bilinear", align_corners=False)[0]
        expected = direct_chain(semantic_inference(class_logits, up), (16, 24), *sizes[1:])
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert result.scores.shape == (4, 30, 44) and result.class_map.shape == (30, 44)


def test_postprocess_resizes_only_needed_queries_with_the_same_results():
    g = torch.Generator().manual_seed(5)
    q, k = 12, 4
    logits = torch.randn(2, q, k + 1, generator=g) * 4
    masks = torch.randn(2, q, 6, 8, generator=g) * 3
    outputs = {"pred_logits": logits, "pred_masks": masks}
    sizes = dict(padded_size=(24, 32), image_size=(22, 30), original_size=(40, 53))
    things = [True, False, True, False]
    full = resize_mask_logits(masks[1], *sizes.values())

    geometry = ImageGeometry(**sizes)
    settings = PostprocessSettings(tuple(things), object_mask_threshold=0.5, overlap_threshold=0.3)
    pan = postprocess(outputs, 1, "panoptic", settings, geometry)
    ref = panoptic_inference(logits[1], full, things, object_mask_threshold=0.5, overlap_threshold=0.3)
    assert isinstance(pan, PanopticResult) and pan.segments == ref.segments and pan.segments
    np.testing.assert_array_equal(pan.id_map, ref.id_map)

    settings = PostprocessSettings(tuple(things), top_k=10, chunk_size=3)
    inst = postprocess(outputs, 1, "instance", settings, geometry)
    ref = instance_inference(logits[1], full, thing_classes=things, top_k=10)
    assert isinstance(inst, InstanceResult) and len(inst.scores) > 0
    np.testing.assert_array_equal(inst.masks, ref.masks)
    np.testing.assert_array_equal(inst.classes, ref.classes)
    np.testing.assert_allclose(inst.scores, ref.scores, rtol=1e-6)
    np.testing.assert_array_equal(inst.boxes, ref.boxes)

    sem = postprocess(outputs, 1, "semantic", PostprocessSettings(), geometry)
    assert sem.class_map.shape == (40, 53)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="thing_classes"):
        panoptic_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3), [True])
    with pytest.raises(ValueError, match="task"):
        outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4)}
        postprocess(outputs, 0, "depth", PostprocessSettings())
    with pytest.raises(ValueError, match="mask_logits"):
        semantic_inference(torch.zeros(2, 4), torch.zeros(3, 3, 3))
