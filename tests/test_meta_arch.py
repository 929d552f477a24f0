"""Mask2Former meta-architecture wiring, with small stand-in backbone and pixel decoder modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mask2former.modeling.mask2former import Mask2Former
from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

CONV_DIM, MASK_DIM, NUM_CLASSES, NUM_QUERIES = 16, 8, 6, 5


class StandInBackbone(nn.Module):
    """res2..res5 at strides 4..32: average pooling + a 1x1 conv per stage."""

    out_channels = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv2d(3, ch, 1) for name, ch in self.out_channels.items()})

    def forward(self, images):
        return {name: conv(F.avg_pool2d(images, self.strides[name])) for name, conv in self.convs.items()}


class StandInPixelDecoder(nn.Module):
    """mask_features from res2; multi-scale features from res5, res4, res3 (1/32, 1/16, 1/8)."""

    levels = ("res5", "res4", "res3")

    def __init__(self, in_channels):
        super().__init__()
        self.mask_features = nn.Conv2d(in_channels["res2"], MASK_DIM, 1)
        self.input_proj = nn.ModuleList(nn.Conv2d(in_channels[n], CONV_DIM, 1) for n in self.levels)

    def forward(self, features):
        multi_scale = [proj(features[n]) for proj, n in zip(self.input_proj, self.levels, strict=True)]
        return self.mask_features(features["res2"]), multi_scale


def make_model(dec_layers: int = 9) -> Mask2Former:
    torch.manual_seed(0)
    backbone = StandInBackbone()
    predictor = MultiScaleMaskedTransformerDecoder(
        in_channels=CONV_DIM,
        num_classes=NUM_CLASSES,
        hidden_dim=16,
        num_queries=NUM_QUERIES,
        num_heads=2,
        dim_feedforward=32,
        dec_layers=dec_layers,
        mask_dim=MASK_DIM,
    )
    return Mask2Former(backbone, StandInPixelDecoder(backbone.out_channels), predictor)


def test_state_dict_uses_official_prefixes():
    model = make_model()
    prefixes = {
        key.split(".")[0] if key.startswith("backbone.") else ".".join(key.split(".")[:2])
        for key in model.state_dict()
    }
    assert prefixes == {"backbone", "sem_seg_head.pixel_decoder", "sem_seg_head.predictor"}
    assert "sem_seg_head.predictor.query_feat.weight" in model.state_dict()
    assert "sem_seg_head.pixel_decoder.mask_features.weight" in model.state_dict()
    assert model.num_classes == NUM_CLASSES and model.num_queries == NUM_QUERIES


def test_eval_mode_returns_contract_shapes_without_aux():
    model = make_model().eval()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 24)


def test_training_mode_returns_one_aux_output_per_decoder_layer():
    model = make_model().train()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = model(images)
    assert len(out["aux_outputs"]) == 9
    assert out["aux_outputs"][0]["pred_masks"].shape == (1, NUM_QUERIES, 16, 16)
    assert "aux_outputs" not in model(images, return_aux=False)
    assert "aux_outputs" in model.eval()(images, return_aux=True)


def test_forward_equals_components_called_by_hand():
    model = make_model(dec_layers=3).eval()
    images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(images)
        mask_features, multi_scale = model.sem_seg_head.pixel_decoder(model.backbone(images))
        expected = model.sem_seg_head.predictor(multi_scale, mask_features, return_aux=False)
    assert torch.equal(out["pred_logits"], expected["pred_logits"])
    assert torch.equal(out["pred_masks"], expected["pred_masks"])


def test_unpadded_images_are_a_clear_error():
    model = make_model(dec_layers=1).eval()
    with pytest.raises(ValueError, match="not padded to a multiple of 32"):
        model(torch.zeros(1, 3, 64, 70))
