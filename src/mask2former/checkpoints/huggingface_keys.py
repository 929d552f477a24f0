"""Key mapping between our state dict and a Hugging Face Mask2Former folder, for one config.

Written out from both module structures (transformers need not be installed): plain renames, and the
official fused q/k/v matrices that HF stores as three separate projections (concatenated in q, k, v order).
"""

from __future__ import annotations

from mask2former.config import BackboneConfig, ModelConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]
ENC = "model.pixel_level_module.encoder."  # backbone
PIX = "model.pixel_level_module.decoder."  # pixel decoder
TRF = "model.transformer_module."  # transformer decoder


def key_mapping(config: ModelConfig) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, str, str]]]]:
    """(renames [(our key, HF key)], fused [(our key, (HF q, HF k, HF v keys))]) for `config`."""
    renames: list[tuple[str, str]] = []
    fused: list[tuple[str, tuple[str, str, str]]] = []

    def pair(ours: str, hf: str, params: tuple[str, ...] = ("weight", "bias")) -> None:
        renames.extend((f"{ours}.{p}", f"{hf}.{p}") for p in params)

    def fuse(
        ours: str, hf_modules: tuple[str, ...], our_params: tuple[str, str] = ("weight", "bias")
    ) -> None:
        for our_param, hf_param in zip(our_params, ("weight", "bias"), strict=True):
            fused.append((f"{ours}{our_param}", tuple(f"{m}.{hf_param}" for m in hf_modules)))

    if config.backbone.kind == "swin":
        _swin_keys(config.backbone, pair, fuse)
    else:
        _resnet_keys(config.backbone, pair)

    pd = config.pixel_decoder
    for i in range(3):
        for j in range(2):
            pair(f"sem_seg_head.pixel_decoder.input_proj.{i}.{j}", f"{PIX}input_projections.{i}.{j}")
    renames.append(("sem_seg_head.pixel_decoder.transformer.level_embed", f"{PIX}level_embed"))
    for i in range(pd.num_encoder_layers):
        ours, hf = f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}", f"{PIX}encoder.layers.{i}"
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            pair(f"{ours}.self_attn.{name}", f"{hf}.self_attn.{name}")
        for our_name, hf_name in (("norm1", "self_attn_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2")):
            pair(f"{ours}.{our_name}", f"{hf}.{hf_name}")
        pair(f"{ours}.norm2", f"{hf}.final_layer_norm")
    pair("sem_seg_head.pixel_decoder.mask_features", f"{PIX}mask_projection")
    for name in ("adapter_1", "layer_1"):  # detectron2 Conv2d owning its norm vs HF Sequential(conv, norm)
        pair(f"sem_seg_head.pixel_decoder.{name}", f"{PIX}{name}.0", ("weight",))
        pair(f"sem_seg_head.pixel_decoder.{name}.norm", f"{PIX}{name}.1")

    dec, pred = config.decoder, "sem_seg_head.predictor"
    pair(f"{pred}.query_feat", f"{TRF}queries_features", ("weight",))
    pair(f"{pred}.query_embed", f"{TRF}queries_embedder", ("weight",))
    pair(f"{pred}.level_embed", f"{TRF}level_embed", ("weight",))
    if pd.conv_dim != dec.hidden_dim:
        for i in range(3):
            pair(f"{pred}.input_proj.{i}", f"{TRF}input_projections.{i}")
    pair(f"{pred}.decoder_norm", f"{TRF}decoder.layernorm")
    for k in range(3):
        pair(f"{pred}.mask_embed.layers.{k}", f"{TRF}decoder.mask_predictor.mask_embedder.{k}.0")
    for i in range(dec.dec_layers):
        hf = f"{TRF}decoder.layers.{i}"
        self_attn = f"{pred}.transformer_self_attention_layers.{i}"
        q_k_v = tuple(f"{hf}.self_attn.{x}_proj" for x in "qkv")
        fuse(f"{self_attn}.self_attn.", q_k_v, ("in_proj_weight", "in_proj_bias"))
        pair(f"{self_attn}.self_attn.out_proj", f"{hf}.self_attn.out_proj")
        pair(f"{self_attn}.norm", f"{hf}.self_attn_layer_norm")
        cross = f"{pred}.transformer_cross_attention_layers.{i}"
        renames.append((f"{cross}.multihead_attn.in_proj_weight", f"{hf}.cross_attn.in_proj_weight"))
        renames.append((f"{cross}.multihead_attn.in_proj_bias", f"{hf}.cross_attn.in_proj_bias"))
        pair(f"{cross}.multihead_attn.out_proj", f"{hf}.cross_attn.out_proj")
        pair(f"{cross}.norm", f"{hf}.cross_attn_layer_norm")
        ffn = f"{pred}.transformer_ffn_layers.{i}"
        pair(f"{ffn}.linear1", f"{hf}.fc1")
        pair(f"{ffn}.linear2", f"{hf}.fc2")
        pair(f"{ffn}.norm", f"{hf}.final_layer_norm")
    pair(f"{pred}.class_embed", "class_predictor")
    return renames, fused


def _swin_keys(bb: BackboneConfig, pair, fuse) -> None:
    pair("backbone.patch_embed.proj", f"{ENC}embeddings.patch_embeddings.projection")
    pair("backbone.patch_embed.norm", f"{ENC}embeddings.norm")
    for i, depth in enumerate(bb.depths):
        for j in range(depth):
            ours, hf = f"backbone.layers.{i}.blocks.{j}", f"{ENC}encoder.layers.{i}.blocks.{j}"
            pair(f"{ours}.norm1", f"{hf}.layernorm_before")
            pair(f"{ours}.attn", f"{hf}.attention.self", ("relative_position_bias_table",))
            fuse(f"{ours}.attn.qkv.", tuple(f"{hf}.attention.self.{x}" for x in ("query", "key", "value")))
            pair(f"{ours}.attn.proj", f"{hf}.attention.output.dense")
            pair(f"{ours}.norm2", f"{hf}.layernorm_after")
            pair(f"{ours}.mlp.fc1", f"{hf}.intermediate.dense")
            pair(f"{ours}.mlp.fc2", f"{hf}.output.dense")
        if i < len(bb.depths) - 1:
            pair(
                f"backbone.layers.{i}.downsample.reduction",
                f"{ENC}encoder.layers.{i}.downsample.reduction",
                ("weight",),
            )
            pair(f"backbone.layers.{i}.downsample.norm", f"{ENC}encoder.layers.{i}.downsample.norm")
        pair(f"backbone.norm{i}", f"{ENC}hidden_states_norms.stage{i + 1}")


_BN = ("weight", "bias", "running_mean", "running_var")


def _resnet_keys(bb: BackboneConfig, pair) -> None:
    pair("backbone.stem.conv1", f"{ENC}embedder.embedder.convolution", ("weight",))
    pair("backbone.stem.conv1.norm", f"{ENC}embedder.embedder.normalization", _BN)
    in_channels = bb.stem_channels
    for s, depth in enumerate(bb.layers):
        out_channels = bb.res2_channels * 2**s
        for b in range(depth):
            ours, hf = f"backbone.res{s + 2}.{b}", f"{ENC}encoder.stages.{s}.layers.{b}"
            # detectron2 projects when channels change; HF also when the stride is 2, which with doubling
            # widths is the same set of blocks (the first of each stage).
            if b == 0 and in_channels != out_channels:
                pair(f"{ours}.shortcut", f"{hf}.shortcut.convolution", ("weight",))
                pair(f"{ours}.shortcut.norm", f"{hf}.shortcut.normalization", _BN)
            for n in range(3):
                pair(f"{ours}.conv{n + 1}", f"{hf}.layer.{n}.convolution", ("weight",))
                pair(f"{ours}.conv{n + 1}.norm", f"{hf}.layer.{n}.normalization", _BN)
        in_channels = out_channels
