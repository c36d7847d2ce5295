"""SigLIP vision tower (so400m/14 at 384 px in LLaVA-OneVision), returning one layer's hidden states.

SigLIP is CLIP's ViT without the class token and without the pre-encoder LayerNorm: a patch
convolution with a bias, one learned position embedding per patch, then the same pre-norm encoder
blocks (`avl.models.clip.ClipEncoderLayer`, reused). Its `post_layernorm` and attention-pooling
`head` only act on the last hidden state of the full model; LLaVA-OneVision reads a hidden state
before them (transformers' `hidden_states[vision_feature_layer]`), so this tower has neither and
the family's key map drops their checkpoint tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

from avl.models.clip import ACTIVATIONS, ClipEncoderLayer, ClipVisionConfig, hidden_state_index
from avl.models.config import require


@dataclass(frozen=True)
class SiglipVisionConfig(ClipVisionConfig):
    """The hub's `vision_config` of a SigLIP vision model (model_type "siglip_vision_model").

    The fields are CLIP's, with SigLIP's defaults (transformers' `SiglipVisionConfig`);
    `vision_use_head` is read for completeness, the head is never built. Unlike CLIP's, the image
    size need not be a multiple of the patch size: so400m/14 reads 384 px images as 27 x 27 patches
    (the convolution drops the last 384 - 27 * 14 = 6 pixel rows and columns).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        require(self.hidden_size % self.num_attention_heads == 0, "vision_config.hidden_size",
                self.hidden_size, f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(1 <= self.patch_size <= self.image_size, "vision_config.patch_size", self.patch_size,
                f"an int in [1, image_size={self.image_size}]")
        require(self.hidden_act in ACTIVATIONS, "vision_config.hidden_act", self.hidden_act, sorted(ACTIVATIONS))

    @property
    def patches_per_side(self) -> int:
        """Patches along each side of an image (the convolution's output size)."""
        return self.image_size // self.patch_size


class SiglipOutput(NamedTuple):
    """`SiglipVisionTower.forward`'s result.

    hidden: the hidden states after the requested layer, [N, P, C] (P = patches, no class token).
    attention: the attention probabilities of the requested encoder layer, [N, H, P, P] in at
        least float32 (rows: queries, columns: keys), or None when none was requested.
    """

    hidden: Tensor
    attention: Tensor | None


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, P, C], rows of patches
        return patches + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """SigLIP ViT; `forward` returns the hidden states after one layer, and optionally one
    encoder layer's attention probabilities (e.g. for VisionZip-style token selection).

    Hidden state 0 is the embedding output, hidden state i the output of encoder layer i;
    negative indices count from the end, as in transformers' `hidden_states`. Layers after the
    requested one are not run.
    """

    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))})

    def forward(self, pixel_values: Tensor, layer: int = -1, attention_layer: int | None = None) -> SiglipOutput:
        """pixel_values [N, 3, S, S] -> `SiglipOutput` (hidden states after `layer`, attention of
        encoder layer `attention_layer` (0-based, negative from the end) when given).

        Only the requested layer materialises its attention matrix; the others run fused SDPA.

        Raises:
            ValueError: `layer` or `attention_layer` out of range, or `attention_layer` after the
                last layer that `layer` runs.
        """
        cfg = self.config
        stop = hidden_state_index(layer, cfg.num_hidden_layers)
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be [N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
                f"got shape {tuple(pixel_values.shape)}"
            )
        probe = None
        if attention_layer is not None:
            n = cfg.num_hidden_layers
            require(isinstance(attention_layer, int) and -n <= attention_layer < n, "attention_layer",
                    attention_layer, f"an int in [{-n}, {n - 1}]")
            probe = attention_layer % n
            require(probe < stop, "attention_layer", attention_layer,
                    f"a layer that runs for hidden state {stop} (encoder layers 0..{stop - 1})")
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        attention = None
        for i, block in enumerate(self.encoder["layers"][:stop]):
            x, probs = block(x, return_probs=i == probe)
            if probs is not None:
                attention = probs
        return SiglipOutput(x, attention)
