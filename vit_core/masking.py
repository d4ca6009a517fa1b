"""Masked image modeling, the framework-neutral part: what both twins check before they
mask patches or score a reconstruction.

The model is SimMIM (Xie et al., 2022) as transformers' `ViTForMaskedImageModeling` has
it: the embeddings of the patches `bool_masked_pos` marks are replaced by one learned
mask token, the encoder runs as usual, and a one-layer decoder (a 1x1 convolution to
`encoder_stride**2 * num_channels` values per patch token, then PixelShuffle) turns every
patch token back into pixels; the loss is the L1 error over the masked patches' pixels.
Both twins call these checks where they read the mask, with the shapes they have, so a
wrong mask fails the same way, with the same words, before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence

from vit_core.config import ViTConfig
from vit_core.errors import InputError


def check_bool_masked_pos(
    mask_shape: Sequence[int], batch: int, grid: tuple[int, int], has_mask_token: bool
) -> None:
    """Refuse a mask the model cannot apply: it has no mask token, or the mask is not one
    entry per patch of this input (`grid` patches per column and row), row-major."""
    if not has_mask_token:
        raise InputError(
            "bool_masked_pos replaces the masked patches' embeddings with the mask token, and "
            "this model has none: build ViTModel(config, use_mask_token=True), or use "
            "ViTForMaskedImageModeling"
        )
    expected = (batch, grid[0] * grid[1])
    if tuple(mask_shape) != expected:
        raise InputError(
            f"bool_masked_pos has shape {tuple(mask_shape)}; this input needs {expected}: "
            f"(batch, patches), one entry per patch of its {grid[0]}x{grid[1]} grid in "
            "row-major order, true where the patch is masked"
        )


def check_reconstruction_loss(config: ViTConfig) -> None:
    """Refuse the loss where the reconstruction cannot line up with the input: the decoder
    unfolds each patch token into `encoder_stride` x `encoder_stride` pixels, so only a
    square patch of that size gives back the input's size (transformers' own check)."""
    stride = config.encoder_stride
    if config.patch_hw != (stride, stride):
        raise InputError(
            "bool_masked_pos asks for the reconstruction loss, which compares the "
            "reconstruction with the input pixel by pixel: it needs encoder_stride equal to "
            f"the patch size, and this config has patch_size={config.patch_size}, "
            f"encoder_stride={stride} (reconstructions without a mask are still given)"
        )
