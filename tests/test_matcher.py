"""Hungarian matcher: point sampling, the cost terms, optimality of the assignment, seeded points."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mask2former.training import matcher as matcher_module
from mask2former.training.matcher import (
    HungarianMatcher,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    point_generator,
    point_sample,
)


def pixel_centres(height: int, width: int) -> torch.Tensor:
    """(H*W, 2) (x, y) coordinates of the pixel centres, in the row-major order of mask.flatten()."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)


@pytest.fixture
def points_at_pixel_centres(monkeypatch):
    """Make the matcher's 'random' points the pixel centres of a (size x size) mask."""

    def use(size: int):
        def fake(num_masks, num_points, device, generator=None):
            assert num_points == size * size
            return pixel_centres(size, size).to(device).expand(num_masks, -1, -1)

        monkeypatch.setattr(matcher_module, "random_point_coords", fake)

    return use


def direct_cost(logits, masks, labels, target_masks, weights=(2.0, 5.0, 5.0)):
    """The matching cost written pair by pair at full resolution, no matrix tricks."""
    probs = logits.softmax(-1)
    cost = torch.zeros(len(masks), len(labels))
    for q in range(len(masks)):
        for n in range(len(labels)):
            m, t = masks[q].flatten(), target_masks[n].flatten()
            bce = F.binary_cross_entropy_with_logits(m, t)
            s = m.sigmoid()
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            cost[q, n] = -weights[0] * probs[q, labels[n]] + weights[1] * bce + weights[2] * dice
    return cost


def brute_force_min(cost: torch.Tensor) -> float:
    """Smallest total cost of a one-to-one assignment, over all permutations (Q >= N or Q < N)."""
    q, n = cost.shape
    if q >= n:
        return min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n)).item()
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(n), q)).item()


def random_image(generator, queries=4, targets=3, classes=5, size=6):
    logits = torch.randn(queries, classes + 1, generator=generator) * 2
    masks = torch.randn(queries, size, size, generator=generator) * 3
    labels = torch.randint(0, classes, (targets,), generator=generator)
    target_masks = (torch.rand(targets, size, size, generator=generator) > 0.5).float()
    return logits, masks, labels, target_masks


def test_point_sample_reads_pixel_centres_and_pads_with_zeros():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 5, 7)
    coords = pixel_centres(5, 7).expand(2, -1, -1)
    sampled = point_sample(image, coords)
    assert sampled.shape == (2, 3, 35)
    torch.testing.assert_close(sampled, image.flatten(2), atol=1e-6, rtol=0)
    # The top-left corner lies between pixel (0, 0) and three zero-padding pixels.
    corner = point_sample(image, torch.zeros(2, 1, 2))
    torch.testing.assert_close(corner[..., 0], image[:, :, 0, 0] / 4, atol=1e-6, rtol=0)


def test_batch_costs_equal_pairwise_losses():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 50, generator=generator) * 4
    targets = (torch.rand(3, 50, generator=generator) > 0.3).float()
    ce, dice = batch_sigmoid_ce_cost(inputs, targets), batch_dice_cost(inputs, targets)
    for q in range(4):
        for n in range(3):
            expected_ce = F.binary_cross_entropy_with_logits(inputs[q], targets[n])
            s = inputs[q].sigmoid()
            expected_dice = 1 - (2 * (s * targets[n]).sum() + 1) / (s.sum() + targets[n].sum() + 1)
            assert ce[q, n].item() == pytest.approx(expected_ce.item(), abs=1e-5)
            assert dice[q, n].item() == pytest.approx(expected_dice.item(), abs=1e-6)


@pytest.mark.parametrize("queries,targets", [(4, 3), (5, 5), (2, 4)])
def test_assignment_is_optimal_against_brute_force(points_at_pixel_centres, queries, targets):
    size = 6
    points_at_pixel_centres(size)
    matcher = HungarianMatcher(num_points=size * size)
    generator = torch.Generator().manual_seed(queries * 10 + targets)
    for _ in range(4):
        logits, masks, labels, target_masks = random_image(generator, queries, targets, size=size)
        cost = matcher.cost_matrix(logits, masks, labels, target_masks)
        # With the points on every pixel centre the cost is the full-resolution one.
        torch.testing.assert_close(cost, direct_cost(logits, masks, labels, target_masks), atol=1e-5, rtol=0)
        outputs = {"pred_logits": logits[None], "pred_masks": masks[None]}
        [(pred_idx, tgt_idx)] = matcher(outputs, [{"labels": labels, "masks": target_masks}])
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert len(pred_idx) == min(queries, targets)
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(tgt_idx.tolist())) == len(tgt_idx)
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_class_cost_prefers_the_query_that_predicts_the_class():
    # Mask costs off: query q is confident in class q, targets ask for classes in a shuffled order.
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=16)
    logits = torch.full((1, 4, 5), -5.0)
    for q in range(4):
        logits[0, q, q] = 5.0
    labels = torch.tensor([2, 0, 3])
    targets = [{"labels": labels, "masks": torch.zeros(3, 8, 8)}]
    [(pred_idx, tgt_idx)] = matcher({"pred_logits": logits, "pred_masks": torch.zeros(1, 4, 8, 8)}, targets)
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist(), strict=True)) == {0: 2, 1: 0, 2: 3}


def test_mask_cost_prefers_the_overlapping_mask():
    # Identical class scores: only the masks decide; query q predicts exactly target (q + 1) % 3.
    matcher = HungarianMatcher(num_points=400)
    target_masks = torch.zeros(3, 16, 16)
    target_masks[0, :8, :8] = 1
    target_masks[1, 8:, :] = 1
    target_masks[2, :8, 8:] = 1
    pred_masks = (target_masks[[1, 2, 0]] * 2 - 1) * 10
    targets = [{"labels": torch.tensor([1, 1, 1]), "masks": target_masks.bool(), "point_seed": 3}]
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": pred_masks[None]}
    [(pred_idx, tgt_idx)] = matcher(outputs, targets)
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist(), strict=True)) == {0: 1, 1: 2, 2: 0}


def test_empty_targets_give_empty_indices():
    matcher = HungarianMatcher(num_points=16)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8)},
    ]
    (empty_pred, empty_tgt), (pred_idx, tgt_idx) = matcher(outputs, targets)
    assert empty_pred.shape == empty_tgt.shape == (0,)
    assert empty_pred.dtype == empty_tgt.dtype == torch.int64
    assert len(pred_idx) == len(tgt_idx) == 1


def test_point_seed_makes_points_independent_of_the_batch(monkeypatch):
    drawn = []
    real = matcher_module.random_point_coords

    def recording(num_masks, num_points, device, generator=None):
        coords = real(num_masks, num_points, device, generator)
        drawn.append(coords)
        return coords

    monkeypatch.setattr(matcher_module, "random_point_coords", recording)
    matcher = HungarianMatcher(num_points=32)
    generator = torch.Generator().manual_seed(5)
    images = []
    for seed in (11, 12):
        logits, masks, labels, target_masks = random_image(generator, size=8)
        images.append((logits, masks, {"labels": labels, "masks": target_masks, "point_seed": seed}))

    def run(batch, layer=0):
        drawn.clear()
        outputs = {
            "pred_logits": torch.stack([b[0] for b in batch]),
            "pred_masks": torch.stack([b[1] for b in batch]),
        }
        indices = matcher(outputs, [b[2] for b in batch], layer=layer)
        return indices, list(drawn)

    pair_indices, pair_points = run(images)
    alone_indices, alone_points = run(images[1:])
    torch.testing.assert_close(pair_points[1], alone_points[0], rtol=0, atol=0)  # same image, same points
    assert not torch.equal(pair_points[0], pair_points[1])  # different images, different points
    assert all(torch.equal(a, b) for a, b in zip(pair_indices[1], alone_indices[0], strict=True))
    _, other_layer_points = run(images[1:], layer=1)
    assert not torch.equal(other_layer_points[0], alone_points[0])  # each decoder layer draws its own


def test_point_generator_is_a_pure_function_of_its_inputs():
    first = torch.rand(5, generator=point_generator(2**62 + 7, 0, 3, "cpu"))
    again = torch.rand(5, generator=point_generator(2**62 + 7, 0, 3, "cpu"))
    other_stream = torch.rand(5, generator=point_generator(2**62 + 7, 1, 3, "cpu"))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other_stream)


def test_diverged_predictions_raise_a_clear_error():
    matcher = HungarianMatcher(num_points=16)
    logits = torch.randn(1, 3, 4)
    logits[0, 1, 0] = float("nan")
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(1, 3, 8, 8)}
    with pytest.raises(FloatingPointError, match="diverged"):
        matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}])


def test_diverged_predictions_under_ddp_match_instead_of_raising_on_one_rank(monkeypatch):
    # One rank raising alone would hang the others; the NaN loss stops all ranks together instead.
    from mask2former.training import matcher as matcher_module

    monkeypatch.setattr(matcher_module, "is_distributed", lambda: True)
    matcher = HungarianMatcher(num_points=16)
    logits = torch.randn(1, 3, 4)
    logits[0, 1, 0] = float("nan")
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(1, 3, 8, 8)}
    [(pred_idx, tgt_idx)] = matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8)}])
    assert tgt_idx.tolist() == [0] and len(pred_idx) == 1 and pred_idx.dtype == torch.int64
