"""ViT in PyTorch. The Flax twin (`vit_flax/modeling.py`) has the same blocks in the same order.

Pre-norm Transformer encoder over patch embeddings (Dosovitskiy et al., 2021), with
transformers' public API. Weights live under the internal names of `vit_core.layout`
(query, key and value fused into one projection); `from_pretrained` and
`save_pretrained` translate to and from the canonical Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_core.config import TANH_GELU, ViTConfig
from vit_core.initialization import initial_weights
from vit_core.intermediates import Indices, arrange, check_output_fmt, patch_grid, take_indices
from vit_core.layout import MASKED_IMAGE_MODELING, MIM_KIND, ModelKind
from vit_core.masking import check_bool_masked_pos, check_reconstruction_loss
from vit_core.outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from vit_core.resample import grid_resize_matrices, interpolation_mode


def activation(name: str) -> nn.Module:
    """transformers' ACT2FN names -> modules (validated by `ViTConfig`)."""
    if name == "gelu":
        return nn.GELU()
    if name in TANH_GELU:
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return _QuickGELU()
    return {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}[name]()


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ViTEmbeddings(nn.Module):
    """Patches -> tokens: stride-P convolution, the mask token in place of the masked
    patches (`use_mask_token`, masked image modeling), the prefix tokens (class,
    distillation, registers), position embeddings, dropout (docs/families.md gives the
    order)."""

    def __init__(self, config: ViTConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_mask_token else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_class_token else None
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, dim)) if config.use_distillation_token else None
        )
        registers = config.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_positions, dim))
        patch = config.patch_hw
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, dim, patch, stride=patch, bias=config.patch_embedding_bias
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def positions_for(self, grid: tuple[int, int], interpolation: str) -> torch.Tensor:
        """Position embeddings for a `grid` of patches, resampled when it differs from training."""
        if grid == self.config.grid_hw:
            return self.position_embeddings
        prefix = self.config.num_position_prefix
        table = self.position_embeddings
        rows, cols = (  # host constants: on the table's device, in its dtype
            torch.tensor(m, dtype=table.dtype, device=table.device)
            for m in grid_resize_matrices(self.config.grid_hw, grid, interpolation)
        )
        patches = table[0, prefix:].reshape(*self.config.grid_hw, -1)
        resized = torch.einsum("ah,bw,hwd->abd", rows, cols, patches).reshape(
            1, -1, table.shape[-1]
        )
        return torch.cat([table[:, :prefix], resized], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        interpolate_pos_encoding: bool | str,
    ) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:  # transformers' blend: exact for a 0/1 mask
            check_bool_masked_pos(
                bool_masked_pos.shape, x.shape[0], grid, self.mask_token is not None
            )
            assert self.mask_token is not None  # checked
            mask = bool_masked_pos.unsqueeze(-1).to(x)  # x's dtype and device, as type_as
            x = x * (1.0 - mask) + self.mask_token * mask
        if interpolate_pos_encoding:
            positions = self.positions_for(grid, interpolation_mode(interpolate_pos_encoding))
        else:
            positions = self.position_embeddings
        prefix = [
            token.expand(x.shape[0], -1, -1)
            for token in (self.cls_token, self.distillation_token, self.register_tokens)
            if token is not None
        ]
        if self.config.no_embed_class:
            x = torch.cat([*prefix, x + positions], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + positions
        return self.dropout(x)


class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = config.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        if output_attentions:  # the fused kernel cannot return the probabilities
            scores = (q @ k.transpose(-2, -1)) * self.scale
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # float32, as the twin
            probs = F.dropout(probs, dropout, self.training)
            out = probs @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_dropout(self.proj(out)), probs


class ViTMlp(nn.Module):
    """fc1, activation, fc2; `gated`: fc1 gives two halves, activation(first) * second
    (SwiGLU, `use_swiglu_ffn`)."""

    def __init__(self, config: ViTConfig, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        width = config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, 2 * width if gated else width)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(width, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.gated:
            gate, x = x.chunk(2, dim=-1)
            x = self.act(gate) * x
        else:
            x = self.act(x)
        return self.dropout(self.fc2(x))


class ViTLayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT, DeiT-3, DINOv2)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTDropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016), as timm's `DropPath`: in training, each
    sample's residual branch is zeroed with probability `rate` and kept ones are scaled by
    1 / (1 - rate), so the expected output is unchanged; the identity in eval and at rate 0."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)  # ViTConfig keeps the rate below 1

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class ViTLayer(nn.Module):
    """Pre-norm block: x + drop_path(ls1(attention(norm1(x)))), then
    x + drop_path(ls2(mlp(norm2(x)))); `drop_path_rate` is this block's
    (`ViTConfig.drop_path_rates`)."""

    def __init__(self, config: ViTConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        scaled = config.layerscale_value is not None
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTAttention(config)
        self.ls1 = ViTLayerScale(config) if scaled else nn.Identity()
        self.drop_path1 = ViTDropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMlp(config, config.use_swiglu_ffn)
        self.ls2 = ViTLayerScale(config) if scaled else nn.Identity()
        self.drop_path2 = ViTDropPath(drop_path_rate)

    def forward(
        self, x: torch.Tensor, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.attention(self.norm1(x), output_attentions)
        x = x + self.drop_path1(self.ls1(attended))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), probs


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(config, rate) for rate in config.drop_path_rates)
        # Set by the models' `gradient_checkpointing_enable` (transformers' attribute).
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        output_attentions: bool,
        output_hidden_states: bool,
        num_layers: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """The blocks in order: the first `num_layers` of them when given (what
        `forward_intermediates(stop_early=True)` runs), else all.

        With gradient checkpointing on, in training with gradients enabled (as transformers
        checks), each block keeps only its input and runs again in the backward pass;
        non-reentrant, the recomputation restores the RNG state, so it draws the same
        dropout and drop-path masks as the forward pass did."""
        hidden_states, attentions = [x], []
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in layers:
            if recompute:
                x, probs = checkpoint(layer, x, output_attentions, use_reentrant=False)
            else:
                x, probs = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        return (
            x,
            tuple(hidden_states) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )


class ViTProbeAttention(nn.Module):
    """Attention from one learned probe to every token: the query projection reads the
    probe, key and value the tokens (rows 0:D, D:2D, 2D:3D of one fused projection, as
    `nn.MultiheadAttention` stores them)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = config.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, probe: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q = self.qkv(probe)[..., :dim].reshape(batch, 1, self.num_heads, -1).transpose(1, 2)
        kv = self.qkv(x)[..., dim:].reshape(batch, tokens, 2, self.num_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, 1, dim)
        return self.proj(out)


class ViTMAPHead(nn.Module):
    """Multihead attention pooling (big_vision `MAPHead`, SigLIP): a learned probe attends
    to the patch tokens (prefix tokens excluded, as timm's `AttentionPoolLatent` is fed),
    then a residual MLP; the image embedding is the probe's output."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = ViTProbeAttention(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :]
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)
        h = h + self.mlp(self.norm(h))
        return h[:, 0]


class ViTPooler(nn.Module):
    """Dense + activation over the pooled token (the JAX `pre_logits` layer)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.act = activation(config.pooler_act)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(pooled))


class ViTMIMDecoder(nn.Module):
    """SimMIM's one-layer decoder: a 1x1 convolution from each patch token to
    `encoder_stride**2 * num_channels` values, unfolded by PixelShuffle into an
    `encoder_stride` x `encoder_stride` block of pixels (transformers' `decoder`)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        stride = config.encoder_stride
        self.projection = nn.Conv2d(
            config.hidden_size, stride**2 * config.num_channels, kernel_size=1
        )
        self.pixel_shuffle = nn.PixelShuffle(stride)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, D) patch tokens of a `grid` of patches -> (B, C, rows * s, cols * s)."""
        batch, _, dim = patches.shape
        x = patches.transpose(1, 2).reshape(batch, dim, *grid)
        return self.pixel_shuffle(self.projection(x))


def pool(x: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """The class token, or the mean of the patch tokens (`config.pooling_type` cls / mean)."""
    if config.pooling_type == "mean":
        return x[:, config.num_prefix_tokens :].mean(dim=1)
    return x[:, 0]


def unpooled(embedding: torch.Tensor, config: ViTConfig) -> torch.Tensor | None:
    """`pooler_output` of a model without a pooling layer: None for a transformers ViT
    (its `ViTModel(add_pooling_layer=False)` returns none), else the family's image
    embedding, as its transformers class returns it (DINOv2, CLIP, SigLIP)."""
    return None if config.transformers_compatible else embedding


def _layer_norm_if(condition: bool, config: ViTConfig) -> nn.Module | None:
    """A LayerNorm over the width where the config has one, else None."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if condition else None


class ViTPreTrainedModel(nn.Module):
    """Weight initialisation and folder I/O shared by the two models."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config

    def init_weights(self, seed: int | None = None) -> None:
        """Truncated normal(initializer_range) weights, zero biases, unit norms (as the twin).

        Drawn by `vit_core.initialization.initial_weights`: the twin's `init_weights(seed)`
        gives the same numbers. `seed=None` takes the seed from torch's generator, so
        `torch.manual_seed` decides. A model on the meta device (built to have weights
        assigned next, as `load` does) draws nothing.
        """
        if next(self.parameters()).is_meta:
            return
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        drawn = initial_weights(self.config, self.kind, seed)
        self.load_state_dict({k: torch.from_numpy(v) for k, v in drawn.items()})

    @property
    def kind(self) -> ModelKind:
        raise NotImplementedError

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in the backward pass instead of keeping its activations
        (transformers' name): a training step then holds one block's activations and each
        block's input rather than every block's, for about one more forward pass of
        compute. Acts in training mode with gradients enabled; the gradients are the same."""
        self._encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every block's activations for the backward pass again (the default)."""
        self._encoder.gradient_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for `gradient_checkpointing_enable` / `gradient_checkpointing_disable`."""
        self._encoder.gradient_checkpointing = enable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._encoder.gradient_checkpointing

    @property
    def _encoder(self) -> ViTEncoder:
        return next(m for m in self.modules() if isinstance(m, ViTEncoder))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        """Load a canonical folder, or a Hugging Face repo id from the local cache (offline;
        `revision=` a branch, tag or commit), into this class (strict: every key must
        match); the keyword arguments are `vit_core.load`'s."""
        from vit_core.loading import load

        # the twin class `cls` is (or subclasses); ViTPreTrainedModel itself: the base model
        twin = next((t for t in _LOADED_AS if issubclass(cls, t)), ViTModel)
        return load(
            pretrained_model_name_or_path,
            backend="torch",
            model_type=_LOADED_AS[twin],
            model_class=cls if issubclass(cls, twin) else twin,
            **kwargs,
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` + `config.json` in the canonical layout."""
        from vit_core.loading import save_folder
        from vit_torch.weights import internal_weights

        return save_folder(folder, self.config, internal_weights(self), self.kind)


class ViTModel(ViTPreTrainedModel):
    """The encoder: `last_hidden_state` (every token) and `pooler_output` (the pooling
    layer's output where there is one, else the image embedding: docs/families.md).
    `use_mask_token` (transformers' name) adds the mask token that `bool_masked_pos`
    puts in place of the masked patches."""

    def __init__(
        self,
        config: ViTConfig,
        add_pooling_layer: bool = True,
        use_mask_token: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(config)
        self.embeddings = ViTEmbeddings(config, use_mask_token)
        self.norm_pre = _layer_norm_if(config.use_pre_norm, config)
        self.encoder = ViTEncoder(config)
        self.layernorm = _layer_norm_if(config.has_token_norm, config)
        self.head = ViTMAPHead(config) if config.pooling_type == "map" else None
        self.fc_norm = _layer_norm_if(config.use_final_norm and config.use_fc_norm, config)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.init_weights(seed)

    @property
    def kind(self) -> ModelKind:
        return ModelKind(
            classifier=False,
            pooler=self.pooler is not None,
            mask_token=self.embeddings.mask_token is not None,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        """`bool_masked_pos` (B, patches), true where a patch is masked: those patches'
        embeddings become the mask token (a model built with `use_mask_token`)."""
        x, hidden_states, attentions = self._encode(
            pixel_values,
            interpolate_pos_encoding,
            output_attentions,
            output_hidden_states,
            bool_masked_pos=bool_masked_pos,
        )
        x = self._token_norm(x)
        embedding = self.head(x) if self.head is not None else pool(x, self.config)
        if self.fc_norm is not None:
            embedding = self.fc_norm(embedding)
        pooled = (
            self.pooler(embedding) if self.pooler is not None else unpooled(embedding, self.config)
        )
        out = BaseModelOutputWithPooling(x, pooled, hidden_states, attentions)
        return out if return_dict else out.to_tuple()

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: Indices = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> tuple[torch.Tensor, list[Any]] | list[Any]:
        """The outputs of the blocks `indices` names, as timm's `forward_intermediates`
        computes and returns them (docs/architecture.md, "Intermediate layers").

        `(final, intermediates)`, or the list alone with `intermediates_only`. `final`: the
        final token norm (`layernorm`; none where the config has none) of the last block
        run, which is the last block unless `stop_early` ends the run at the last one
        asked for. `intermediates`: one per block asked for, in block order, each normed
        by the same norm if `norm`; `output_fmt="NCHW"` gives the patch tokens as a
        (B, D, H/P, W/P) map, "NLC" as (B, L, D), the prefix tokens (class, distillation,
        registers) split off and, with `return_prefix_tokens`, paired with them as
        `(patches, prefix)`.
        """
        check_output_fmt(output_fmt)
        take, last = take_indices(self.config.num_hidden_layers, indices)
        x, hidden_states, _ = self._encode(
            pixel_values, interpolate_pos_encoding, False, True, last + 1 if stop_early else None
        )
        assert hidden_states is not None  # asked for
        states = [hidden_states[i + 1] for i in take]  # [0] is the embeddings' output
        if norm:
            states = [self._token_norm(s) for s in states]
        grid = patch_grid(self.config.patch_hw, pixel_values.shape)

        def to_map(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(len(y), *grid, -1).permute(0, 3, 1, 2).contiguous()

        intermediates = arrange(
            states,
            self.config.num_prefix_tokens,
            to_map if output_fmt == "NCHW" else None,
            return_prefix_tokens,
        )
        return intermediates if intermediates_only else (self._token_norm(x), intermediates)

    def _encode(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | str,
        output_attentions: bool,
        output_hidden_states: bool,
        num_layers: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """What `forward` and `forward_intermediates` share: the input check, embeddings
        (masked where `bool_masked_pos` says), pre-norm and the encoder's blocks
        (`num_layers` of them: `ViTEncoder`), before the final norm."""
        self.config.check_pixel_shape(tuple(pixel_values.shape), interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embeddings.position_embeddings.dtype)
        x = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return self.encoder(x, output_attentions, output_hidden_states, num_layers)

    def _token_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm over every token, where the config has one."""
        return x if self.layernorm is None else self.layernorm(x)


class ViTForImageClassification(ViTPreTrainedModel):
    """ViT + a linear classifier on the image embedding (or on the pooler, if the config
    says); a distilled model (DeiT) has a second head on the distillation token."""

    def __init__(self, config: ViTConfig, seed: int | None = None) -> None:
        super().__init__(config)
        # Built without drawing: init_weights below draws the encoder's weights with the head's.
        with torch.device("meta"):
            vit = ViTModel(config, add_pooling_layer=config.classifier_uses_pooler)
        self.vit = vit.to_empty(device=torch.get_default_device())
        self.classifier: nn.Module = (
            nn.Linear(config.hidden_size, config.num_labels)
            if config.num_labels > 0
            else nn.Identity()
        )
        self.distillation_classifier = (
            nn.Linear(config.hidden_size, config.num_labels)
            if config.num_labels > 0 and config.use_distillation_token
            else None
        )
        self.init_weights(seed)

    @property
    def kind(self) -> ModelKind:
        return ModelKind(classifier=True, pooler=self.config.classifier_uses_pooler)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> ImageClassifierOutput | tuple[Any, ...]:
        base = self.vit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        cls_logits = distillation_logits = None
        if self.distillation_classifier is not None:
            tokens = base.last_hidden_state
            cls_logits = self.classifier(tokens[:, 0])
            distillation_logits = self.distillation_classifier(tokens[:, 1])
            logits = (cls_logits + distillation_logits) / 2
        else:
            features = base.pooler_output
            if features is None:
                features = pool(base.last_hidden_state, self.config)
            logits = self.classifier(features)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        out = ImageClassifierOutput(
            loss,
            logits,
            base.hidden_states,
            base.attentions,
            cls_logits,
            distillation_logits,
        )
        return out if return_dict else out.to_tuple()

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: Indices = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> tuple[torch.Tensor, list[Any]] | list[Any]:
        """The encoder's `ViTModel.forward_intermediates` (the heads read none of it)."""
        return self.vit.forward_intermediates(
            pixel_values,
            indices,
            return_prefix_tokens,
            norm,
            stop_early,
            output_fmt,
            intermediates_only,
            interpolate_pos_encoding,
        )


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, config: ViTConfig
) -> torch.Tensor:
    """transformers' loss by problem type: MSE, cross-entropy, or binary cross-entropy."""
    integer_labels = not torch.is_floating_point(labels)
    problem = config.resolved_problem_type(integer_labels)
    logits32 = logits.float()
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits32.squeeze(), labels.squeeze().float())
        return F.mse_loss(logits32, labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits32.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits32, labels.float())


class ViTForMaskedImageModeling(ViTPreTrainedModel):
    """SimMIM (Xie et al., 2022) as transformers has it: the encoder with a mask token and
    no pooler, and a one-layer decoder from every patch token back to its pixels; with
    `bool_masked_pos`, the L1 reconstruction loss over the masked patches."""

    def __init__(self, config: ViTConfig, seed: int | None = None) -> None:
        super().__init__(config)
        # Built without drawing: init_weights below draws the encoder's weights with the decoder's.
        with torch.device("meta"):
            vit = ViTModel(config, add_pooling_layer=False, use_mask_token=True)
        self.vit = vit.to_empty(device=torch.get_default_device())
        self.decoder = ViTMIMDecoder(config)
        self.init_weights(seed)

    @property
    def kind(self) -> ModelKind:
        return MIM_KIND

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> MaskedImageModelingOutput | tuple[Any, ...]:
        """`bool_masked_pos` (B, patches), true where a patch is masked. `reconstruction`
        covers every patch. Unlike transformers', the decoder reads the input's own patch
        grid, so non-square inputs and the loss at another size work too."""
        if bool_masked_pos is not None:
            check_reconstruction_loss(self.config)
        base = self.vit(
            pixel_values,
            bool_masked_pos,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        patches = base.last_hidden_state[:, self.config.num_prefix_tokens :]
        reconstruction = self.decoder(patches, patch_grid(self.config.patch_hw, pixel_values.shape))
        loss = None
        if bool_masked_pos is not None:
            loss = masked_image_modeling_loss(
                pixel_values, reconstruction, bool_masked_pos, self.config
            )
        out = MaskedImageModelingOutput(loss, reconstruction, base.hidden_states, base.attentions)
        return out if return_dict else out.to_tuple()


def masked_image_modeling_loss(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    config: ViTConfig,
) -> torch.Tensor:
    """SimMIM's loss as transformers computes it: the L1 error summed over the masked
    patches' pixels, divided by their count (+ 1e-5, so that an empty mask gives 0, not
    nan) and by the channels, i.e. the mean absolute error per masked pixel value."""
    ph, pw = config.patch_hw
    grid = patch_grid(config.patch_hw, pixel_values.shape)
    error = (pixel_values.float() - reconstruction.float()).abs()
    mask = bool_masked_pos.reshape(-1, *grid).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    mask = mask.unsqueeze(1).to(error)  # (B, 1, H, W): one entry per pixel, every channel
    return (error * mask).sum() / (mask.sum() + 1e-5) / config.num_channels


# The `vit_core.load` model type of each model class, for `from_pretrained`.
_LOADED_AS: dict[type[ViTPreTrainedModel], str] = {
    ViTForImageClassification: "classification",
    ViTForMaskedImageModeling: MASKED_IMAGE_MODELING,
    ViTModel: "base",
}
