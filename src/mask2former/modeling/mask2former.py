"""The Mask2Former meta-architecture: backbone -> pixel decoder -> masked-attention transformer decoder.

Module names follow the official checkpoints: `backbone.*`, `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`. Pre-processing (normalisation, padding) and post-processing (semantic,
panoptic, instance inference) live outside the nn.Module, so the module maps a padded image batch to
raw predictions and nothing else; that is also exactly what gets exported.
"""

from __future__ import annotations

import torch
from torch import nn

from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder


class MaskFormerHead(nn.Module):
    """The official `sem_seg_head`: pixel decoder, then the transformer decoder (`predictor`).

    pixel_decoder(features dict) -> (mask_features (B, mask_dim, H/4, W/4),
    [multi-scale features (B, C, h_l, w_l) at 1/32, 1/16, 1/8]).
    """

    def __init__(self, pixel_decoder: nn.Module, predictor: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = predictor.num_classes

    def forward(self, features: dict[str, torch.Tensor], return_aux: bool) -> dict:
        """Backbone features {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)} -> predictions."""
        mask_features, multi_scale_features = self.pixel_decoder(features)
        return self.predictor(multi_scale_features, mask_features, return_aux=return_aux)


class Mask2Former(nn.Module):
    """Image batch -> per-query class logits and mask logits (plus deep-supervision outputs in training).

    `backbone` returns {"res2".."res5"} at strides 4..32 and has `out_channels: dict[str, int]`.
    Inputs must already be normalised and padded to a multiple of `size_divisibility` (zeros after
    normalisation), e.g. by `mask2former.inference.preprocess.pad_batch`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        predictor: MultiScaleMaskedTransformerDecoder,
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = MaskFormerHead(pixel_decoder, predictor)
        self.size_divisibility = size_divisibility
        self.num_classes = predictor.num_classes
        self.num_queries = predictor.num_queries

    def forward(self, images: torch.Tensor, return_aux: bool | None = None) -> dict:
        """images (B, 3, H, W), normalised and padded -> {"pred_logits": (B, Q, K+1),
        "pred_masks": (B, Q, H/4, W/4)}, plus "aux_outputs" (one such dict per decoder layer) when
        `return_aux`; `return_aux=None` means "when training", as deep supervision is a training need.
        """
        if return_aux is None:
            return_aux = self.training
        self._check_padded(images)
        features = self.backbone(images)
        return self.sem_seg_head(features, return_aux=return_aux)

    def _check_padded(self, images: torch.Tensor) -> None:
        # Shapes are symbolic while tracing for export; the exporter's caller fixes the input size.
        if self.size_divisibility <= 0 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        height, width = images.shape[-2:]
        if height % self.size_divisibility or width % self.size_divisibility:
            raise ValueError(
                f"images of size {height}x{width} are not padded to a multiple of {self.size_divisibility}: "
                "pad them first (mask2former.inference.preprocess.pad_batch)"
            )
