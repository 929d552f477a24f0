"""SetCriterion: point losses vs full resolution, weighted CE, empty targets, normalisation, aux losses."""

import pytest
import torch
import torch.nn.functional as F

from mask2former.training import criterion as criterion_module
from mask2former.training.criterion import SetCriterion, uncertain_point_coords
from mask2former.training.matcher import HungarianMatcher, random_point_coords

NUM_CLASSES = 5


class FixedMatcher:
    """A matcher stub returning fixed indices, so the loss is tested apart from the matching."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(p), torch.tensor(t)) for p, t in indices]

    def __call__(self, outputs, targets, layer=0, generator=None):
        return self.indices


def pixel_centres(size: int) -> torch.Tensor:
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)


def make_batch(seed=0, batch=2, queries=6, size=8, target_size=8, counts=(3, 2), aux=0, grad=False):
    generator = torch.Generator().manual_seed(seed)

    def prediction():
        logits = torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator)
        masks = torch.randn(batch, queries, size, size, generator=generator) * 3
        return {"pred_logits": logits.requires_grad_(grad), "pred_masks": masks.requires_grad_(grad)}

    outputs = prediction()
    if aux:
        outputs["aux_outputs"] = [prediction() for _ in range(aux)]
    targets = []
    for i, count in enumerate(counts):
        masks = torch.rand(count, target_size, target_size, generator=generator) > 0.5
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        targets.append({"labels": labels, "masks": masks, "point_seed": 100 + seed * 10 + i})
    return outputs, targets


def test_point_losses_equal_full_resolution_when_points_are_the_pixels(monkeypatch):
    size = 8
    monkeypatch.setattr(
        criterion_module,
        "uncertain_point_coords",
        lambda masks, *args: pixel_centres(size).expand(len(masks), -1, -1),
    )
    indices = [([4, 0, 2], [1, 2, 0]), ([5, 1], [0, 1])]
    criterion = SetCriterion(NUM_CLASSES, FixedMatcher(indices), num_points=size * size)
    outputs, targets = make_batch(size=size, target_size=size)
    losses = criterion(outputs, targets)

    bce, dice = 0.0, 0.0
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        logits = outputs["pred_masks"][b, pred_idx].flatten(1)
        labels = targets[b]["masks"][tgt_idx].flatten(1).float()
        bce += F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum()
        probs = logits.sigmoid()
        dice += (1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + labels.sum(1) + 1)).sum()
    num_masks = 5
    assert losses["loss_mask"].item() == pytest.approx(bce.item() / num_masks, abs=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice.item() / num_masks, abs=1e-5)


def test_class_loss_is_cross_entropy_with_no_object_weight():
    indices = [([4, 0, 2], [1, 2, 0]), ([5, 1], [0, 1])]
    criterion = SetCriterion(NUM_CLASSES, FixedMatcher(indices), eos_coef=0.1, num_points=16)
    outputs, targets = make_batch()
    target_classes = torch.full((2, 6), NUM_CLASSES)
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        target_classes[b, pred_idx] = targets[b]["labels"][tgt_idx]
    weight = torch.ones(NUM_CLASSES + 1)
    weight[-1] = 0.1
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight=weight)
    assert criterion(outputs, targets)["loss_ce"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 1, 0.1])
    assert "empty_weight" in criterion.state_dict()


def test_importance_sampling_keeps_the_most_uncertain_candidates():
    torch.manual_seed(0)
    mask_logits = torch.randn(3, 1, 10, 10) * 4
    seed_generator = torch.Generator().manual_seed(9)
    coords = uncertain_point_coords(mask_logits, 40, 3.0, 0.75, seed_generator)
    assert coords.shape == (3, 40, 2)
    # Replay the same generator: 120 candidates, then 10 uniform points.
    replay = torch.Generator().manual_seed(9)
    candidates = random_point_coords(3, 120, torch.device("cpu"), replay)
    uniform = random_point_coords(3, 10, torch.device("cpu"), replay)
    uncertainty = -criterion_module.point_sample(mask_logits, candidates)[:, 0].abs()
    for m in range(3):
        expected = candidates[m, uncertainty[m].topk(30).indices]
        assert {tuple(p) for p in coords[m, :30].tolist()} == {tuple(p) for p in expected.tolist()}
    torch.testing.assert_close(coords[:, 30:], uniform, rtol=0, atol=0)


def test_images_without_targets_train_with_zero_mask_gradients():
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=16), num_points=16)
    outputs, targets = make_batch(counts=(0, 0), aux=2, grad=True)
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice_1"].item() == 0
    loss = criterion.total_loss(losses)
    assert torch.isfinite(loss)
    loss.backward()
    # The masks stay in the graph (DDP must see their parameters used), with zero gradient.
    for prediction in [outputs] + outputs["aux_outputs"]:
        assert prediction["pred_masks"].grad is not None
        assert prediction["pred_masks"].grad.abs().max().item() == 0
        assert prediction["pred_logits"].grad.abs().max().item() > 0
    # All queries target no-object: CE is the mean NLL of class K (uniform weights cancel in the mean).
    expected = F.cross_entropy(outputs["pred_logits"].detach().flatten(0, 1), torch.full((12,), NUM_CLASSES))
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_mask_losses_are_normalised_by_the_number_of_target_masks():
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=64), num_points=64)
    outputs, targets = make_batch(batch=1, counts=(3,))
    doubled_outputs = {key: torch.cat([value, value]) for key, value in outputs.items()}
    one = criterion(outputs, targets)
    two = criterion(doubled_outputs, targets + targets)  # same image and seed twice: twice the sum, twice N
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert two[key].item() == pytest.approx(one[key].item(), rel=1e-5)
    assert criterion.normalizers(doubled_outputs, targets + targets)[0] == 6.0
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}]
    assert criterion.normalizers(outputs, empty)[0] == 1.0  # clamped at 1


def test_two_workers_give_the_gradient_of_the_doubled_batch(monkeypatch):
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=64), num_points=64)
    outputs, targets = make_batch(batch=4, counts=(3, 0, 1, 4), aux=1, grad=True)
    criterion.total_loss(criterion(outputs, targets)).backward()
    whole = {key: outputs[key].grad.clone() for key in ("pred_logits", "pred_masks")}

    halves = [slice(0, 2), slice(2, 4)]
    half_outputs = [
        {
            "pred_logits": outputs["pred_logits"].detach()[h].clone().requires_grad_(),
            "pred_masks": outputs["pred_masks"].detach()[h].clone().requires_grad_(),
            "aux_outputs": [{k: v.detach()[h] for k, v in outputs["aux_outputs"][0].items()}],
        }
        for h in halves
    ]
    # Simulated all_reduce: each worker gets the mean of both workers' local normalisers.
    local = [criterion.normalizers(o, targets[h]) for o, h in zip(half_outputs, halves, strict=True)]
    mean = torch.tensor([(local[0][0] + local[1][0]) / 2, float(local[0][1] + local[1][1]) / 2])
    monkeypatch.setattr(criterion_module, "global_mean", lambda values: mean)
    for o, h in zip(half_outputs, halves, strict=True):
        criterion.total_loss(criterion(o, targets[h])).backward()
    for key, grad in whole.items():
        # DDP averages the two workers' gradients.
        averaged = torch.cat([o[key].grad for o in half_outputs]) / 2
        torch.testing.assert_close(averaged, grad, atol=1e-6, rtol=1e-5)


def test_deep_supervision_keys_and_weighted_total():
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=16), num_points=16)
    outputs, targets = make_batch(aux=9)
    losses = criterion(outputs, targets)
    expected_keys = {
        f"loss_{name}{suffix}"
        for name in ("ce", "mask", "dice")
        for suffix in [""] + [f"_{i}" for i in range(9)]
    }
    assert set(losses) == expected_keys
    weights = {"ce": 2.0, "mask": 5.0, "dice": 5.0}
    manual = sum(weights[key.split("_")[1]] * value for key, value in losses.items())
    assert criterion.total_loss(losses).item() == pytest.approx(manual.item(), rel=1e-6)
    with pytest.raises(KeyError, match="weight_dict"):
        criterion.total_loss({"loss_box": torch.tensor(1.0)})


def test_optimising_raw_outputs_overfits_the_targets():
    torch.manual_seed(0)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=256), num_points=256)
    outputs, targets = make_batch(batch=2, queries=8, size=16, target_size=64, counts=(3, 2), grad=True)
    # Few, straight boundaries: bilinear sampling makes labels soft within one target pixel of a boundary
    # and importance sampling gathers points there, so busy random masks keep an irreducible BCE.
    half = 32
    first_image = torch.zeros(3, 64, 64)
    first_image[0, :, :half] = 1
    first_image[1, :half, half:] = 1
    first_image[2, half:, half:] = 1
    second_image = torch.zeros(2, 64, 64)
    second_image[0, :half] = 1
    second_image[1, half:] = 1
    targets[0]["masks"], targets[1]["masks"] = first_image, second_image
    optimizer = torch.optim.Adam([outputs["pred_logits"], outputs["pred_masks"]], lr=0.3)
    first = None
    for _ in range(100):
        loss = criterion.total_loss(criterion(outputs, targets))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10
