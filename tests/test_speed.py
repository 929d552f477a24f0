"""Inference speed work that must not change results: FrozenBN folding, the whole fast path (fast deformable
attention + folding + low-resolution intermediate masks) against the reference path, what the decoder does
at inference (masks at attention size, SDPA with one mask broadcast over heads), and batch inference
against one image at a time on two real photos."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mask2former
from mask2former.config import get_preset
from mask2former.data.image_io import load_image
from mask2former.inference.optimize import (
    OneDNNConv2d,
    OneDNNLinear,
    has_frozen_batchnorm,
    onednn_available,
    optimize_for_inference,
)
from mask2former.inference.postprocess import (
    PostprocessSettings,
    _panoptic_keep,
    postprocess,
    resize_mask_logits,
)
from mask2former.inference.predictor import Predictor, TorchRunner
from mask2former.inference.preprocess import pad_batch
from mask2former.modeling import deform_attn
from mask2former.modeling.kernels import use_kernels
from mask2former.modeling.layers import Conv2d, FrozenBatchNorm2d
from mask2former.profiling import PeakMemory, allocator, matmul_peak_gflops, set_allocator

DATA = Path(__file__).parent / "data"


def tiny_config():
    config = get_preset("synth-tiny")
    # A fixed small backbone, whatever the bundled preset's: with it this seed gives non-empty panoptic maps.
    backbone = config.backbone
    backbone.layers, backbone.stem_channels, backbone.res2_channels = (1, 1, 2, 1), 16, 32
    # A fixed test scale too: the photo tests below rely on the sizes it gives.
    config.input = dataclasses.replace(config.input, short_edge=128, max_size=256)
    # Keep every query that is not no-object, so the panoptic maps of a random model are not empty.
    config.object_mask_threshold = 0.0
    return config


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """synth-tiny with random FrozenBN statistics (folding must do something) and sampling offsets off the
    initial integer ring (bilinear weights strictly between corners)."""
    model = mask2former.build(tiny_config(), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            if isinstance(module, deform_attn.MSDeformAttn):
                module.sampling_offsets.weight.normal_(0, 0.02, generator=gen)
    return model.eval()


def images(batch: int = 1, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reference_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The reference path: grid_sample deformable attention, FrozenBN unfolded, intermediate masks at full
    resolution (aux outputs computed, then dropped)."""
    with use_kernels(deform_attn="reference"), torch.no_grad():
        outputs = model(x, return_aux=True)
    return {key: outputs[key] for key in ("pred_logits", "pred_masks")}


def test_optimize_for_inference_folds_frozen_batchnorm_and_keeps_outputs():
    model = tiny_model()
    x = images()
    with torch.no_grad():
        before = model(x)
    assert has_frozen_batchnorm(model)
    assert optimize_for_inference(model) is model
    assert not has_frozen_batchnorm(model) and not model.training
    with torch.no_grad():
        after = model(x)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-4)


def test_torch_runner_optimises_a_private_copy_and_leaves_the_model_alone():
    model = tiny_model()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    runner = TorchRunner(model)
    x = images()
    got = runner(x)
    assert runner.model is model and has_frozen_batchnorm(model)
    assert not has_frozen_batchnorm(runner.inference_model())
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(type(m) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
               for m in model.modules() if isinstance(m, torch.nn.Linear))  # fmt: skip
    # Editing the caller's model in place is seen: the private copy is rebuilt from it.
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias.add_(1.0)
        expected = model(x, return_aux=False)
    torch.testing.assert_close(runner(x)["pred_logits"], expected["pred_logits"], rtol=0, atol=1e-4)
    assert not torch.allclose(runner(x)["pred_logits"], got["pred_logits"])


def test_fast_path_equals_reference_path_whole_model():
    model = tiny_model()
    x = images(batch=2)
    expected = reference_outputs(copy.deepcopy(model), x)
    with torch.no_grad():
        got = optimize_for_inference(model)(x)
    assert set(got) == {"pred_logits", "pred_masks"}  # no aux outputs at inference
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4)
    config = tiny_config()
    for index in range(2):
        for task in ("semantic", "panoptic"):
            settings = PostprocessSettings(tuple(config.thing_classes), object_mask_threshold=0.0)
            fast, reference = (
                postprocess(got, index, task, settings),
                postprocess(expected, index, task, settings),
            )
            if task == "semantic":
                np.testing.assert_array_equal(fast.class_map, reference.class_map)
            else:
                assert len(reference.segments) > 0
                np.testing.assert_array_equal(fast.id_map, reference.id_map)
                assert [(s.id, s.category_id) for s in fast.segments] == [
                    (s.id, s.category_id) for s in reference.segments
                ]


def test_decoder_at_inference_uses_small_masks_and_one_broadcast_attention_mask(monkeypatch):
    model = optimize_for_inference(tiny_model())
    x = images(height=128, width=160)
    mask_sizes, attention_masks = [], []
    einsum, sdpa = torch.einsum, F.scaled_dot_product_attention

    def recording_einsum(equation, *operands):
        out = einsum(equation, *operands)
        if equation == "bqc,bchw->bqhw":
            mask_sizes.append(tuple(out.shape[-2:]))
        return out

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        attention_masks.append(None if attn_mask is None else (tuple(attn_mask.shape), tuple(q.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch, "einsum", recording_einsum)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        model(x)
    layers = model.sem_seg_head.predictor.num_layers
    memory_sizes = [(128 // s, 160 // s) for s in (32, 16, 8)]
    # One mask per layer at that layer's memory size (1/32, 1/16, 1/8, ...), full resolution only at the end.
    assert mask_sizes == [memory_sizes[i % 3] for i in range(layers)] + [(128 // 4, 160 // 4)]
    # Cross-attention masks are (B, 1, Q, hw): broadcast over heads, never repeated per head.
    cross = [shapes for shapes in attention_masks if shapes is not None]
    assert len(cross) == layers and len(attention_masks) == 2 * layers
    for (mask_shape, query_shape), size in zip(
        cross, [memory_sizes[i % 3] for i in range(layers)], strict=True
    ):
        assert mask_shape == (1, 1, query_shape[2], size[0] * size[1])


def photo_predictor() -> Predictor:
    config = tiny_config()
    return Predictor(TorchRunner(tiny_model(), "cpu"), config, source="test", trained=False)


def decision_margin(outputs: dict, index: int, padded_size, item, config) -> np.ndarray:
    """(H, W) how far each pixel's panoptic decision is from flipping: the smaller of the gap between the two
    best scores * sigmoid(mask) (who owns the pixel) and the owner's |sigmoid - 0.5| (void or not)."""
    class_logits = outputs["pred_logits"][index]
    keep = _panoptic_keep(class_logits, config.object_mask_threshold)
    scores = class_logits[keep].softmax(-1).max(-1).values
    logits = resize_mask_logits(
        outputs["pred_masks"][index][keep], padded_size, tuple(item.image_size), tuple(item.original_size)
    )
    probs = logits.sigmoid()
    top = (scores[:, None, None] * probs).topk(2, dim=0)
    owner_prob = probs.gather(0, top.indices[:1])[0]
    return torch.minimum(top.values[0] - top.values[1], (owner_prob - 0.5).abs()).numpy()


def assert_same_result(got, expected, margin: np.ndarray):
    """Identical id maps except where the decision is a tie within float rounding (1e-5), and identical
    segments (ids, classes). Batch and single runs are not bitwise equal: oneDNN picks another convolution
    kernel for a batch of 2 than for 1 in the small-channel backbone layers (features differ by ~1e-6)."""
    differing = got.id_map != expected.id_map
    assert differing.sum() <= 1e-4 * differing.size
    assert (margin[differing] < 1e-5).all(), margin[differing]
    assert [(s.id, s.category_id, s.isthing) for s in got.segments] == [
        (s.id, s.category_id, s.isthing) for s in expected.segments
    ]


def test_batch_equals_one_at_a_time_on_two_photos():
    # chelsea (451x300) and rocket (640x427) both resize to 128x192 for synth-tiny, so the batch adds no
    # padding: batched results must be those of one image at a time (up to float rounding).
    predictor = photo_predictor()
    photos = [load_image(DATA / "chelsea.png"), load_image(DATA / "rocket.jpg")]
    inputs = [predictor.preprocess(photo) for photo in photos]
    batch = pad_batch([item.tensor for item in inputs], 32)
    assert all(item.tensor.shape[-2:] == batch.shape[-2:] for item in inputs)
    together = predictor.runner(batch)
    batched = predictor.predict_batch(photos, task="panoptic")
    for index, (photo, item) in enumerate(zip(photos, inputs, strict=True)):
        alone = predictor.runner(item.tensor)
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(together[key][index : index + 1], alone[key], rtol=0, atol=1e-4)
        single = predictor.predict(photo, task="panoptic")
        assert len(single.segments) > 0
        margin = decision_margin(alone, 0, tuple(batch.shape[-2:]), item, predictor.config)
        assert_same_result(batched[index].result, single, margin)


def test_batch_with_more_padding_equals_one_image_padded_like_the_batch():
    # A square crop of rocket resizes to 128x128, chelsea to 128x192: in a batch the crop gets 64 more
    # columns of zero padding. As in the official code (detectron2's ImageList pads a batch to its largest
    # image), the padding is part of the input: GroupNorm statistics, deformable sampling and masked
    # attention all see it, so the crop's result may differ from its own-size result. Batching itself must
    # mix nothing between images: each result equals the one image alone, padded to the batch's size.
    predictor = photo_predictor()
    rocket = load_image(DATA / "rocket.jpg")
    photos = [load_image(DATA / "chelsea.png"), np.ascontiguousarray(rocket[:, 100:527])]
    inputs = [predictor.preprocess(photo) for photo in photos]
    assert inputs[0].tensor.shape[-2:] != inputs[1].tensor.shape[-2:]
    batched = predictor.predict_batch(photos, task="panoptic")
    batch = pad_batch([item.tensor for item in inputs], 32)
    padded_size = tuple(batch.shape[-2:])
    together = predictor.runner(batch)
    for index, item in enumerate(inputs):
        alone = predictor.runner(batch[index : index + 1])  # this image alone, padded like the batch
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(together[key][index : index + 1], alone[key], rtol=0, atol=1e-4)
        settings = PostprocessSettings.from_config(predictor.config, "panoptic")
        single = postprocess(alone, 0, "panoptic", settings, item.geometry(padded_size))
        margin = decision_margin(alone, 0, padded_size, item, predictor.config)
        assert_same_result(batched[index].result, single, margin)


def test_peak_memory_sees_a_large_allocation():
    # Released mode: a long test session holds freed memory that would otherwise serve the block unseen.
    with allocator("release"), PeakMemory() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if not peak.available:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert peak.bytes >= 48 * 2**20


def test_allocator_modes_switch_and_restore():
    if not set_allocator("reuse"):
        pytest.skip("glibc is not the allocator here")
    try:
        with allocator("release") as released:
            assert released
            torch.ones(2**20).sum()
    finally:
        assert set_allocator("default")


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(size=128, repeats=1) > 0


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN kernels")


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        Conv2d(8, 8, 1, norm=torch.nn.GroupNorm(2, 8), activation=F.relu),
        torch.nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 6, 7),
    )


@needs_onednn
def test_onednn_modules_keep_parameters_and_results():
    net = small_net()
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        expected = net(x)
        optimize_for_inference(net)
        got = net(x)
    assert [type(m) for m in net] == [
        OneDNNConv2d,
        OneDNNConv2d,
        OneDNNConv2d,
        torch.nn.Flatten,
        OneDNNLinear,
    ]
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # A reloaded or edited weight is repacked; copies pack their own.
    with torch.no_grad():
        net[4].weight.mul_(2)
        net[0].load_state_dict({"weight": net[0].weight * 0.5, "bias": net[0].bias})
        reference = copy.deepcopy(net)
        with use_kernels(onednn=False):
            expected = reference(x)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(net)(x), expected, rtol=0, atol=1e-5)


@needs_onednn
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_onednn_modules_fall_back_for_gradients_and_tracing():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 3, 10, 12)
    net(x).square().sum().backward()  # gradients go through F.linear / F.conv2d
    assert all(p.grad is not None for p in net[4].parameters())
    with torch.no_grad():
        graph = str(torch.jit.trace(net, x).inlined_graph)
    assert "mkldnn" not in graph and "aten::linear" in graph
