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

from vit_core.config import TANH_GELU, ViTConfig
from vit_core.initialization import initial_weights
from vit_core.layout import ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
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
    """Patches -> tokens: stride-P convolution, class token, position embeddings, dropout."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim, prefix = config.hidden_size, config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if prefix else None
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_positions, dim))
        patch = config.patch_hw
        self.patch_embeddings = nn.Conv2d(config.num_channels, dim, patch, stride=patch)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def positions_for(self, grid: tuple[int, int], interpolation: str) -> torch.Tensor:
        """Position embeddings for a `grid` of patches, resampled when it differs from training."""
        if grid == self.config.grid_hw:
            return self.position_embeddings
        prefix = self.config.num_prefix_tokens
        table = self.position_embeddings
        rows, cols = (
            torch.tensor(m, dtype=table.dtype)
            for m in grid_resize_matrices(self.config.grid_hw, grid, interpolation)
        )
        patches = table[0, prefix:].reshape(*self.config.grid_hw, -1)
        resized = torch.einsum("ah,bw,hwd->abd", rows, cols, patches).reshape(
            1, -1, table.shape[-1]
        )
        return torch.cat([table[:, :prefix], resized], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | str
    ) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if interpolate_pos_encoding:
            x = x + self.positions_for(grid, interpolation_mode(interpolate_pos_encoding))
        else:
            x = x + self.position_embeddings
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
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class ViTLayer(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMlp(config)

    def forward(
        self, x: torch.Tensor, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.attention(self.norm1(x), output_attentions)
        x = x + attended
        return x + self.mlp(self.norm2(x)), probs


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, output_attentions: bool, output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        return (
            x,
            tuple(hidden_states) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )


class ViTPooler(nn.Module):
    """Dense + activation over the pooled token (the JAX `pre_logits` layer)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.act = activation(config.pooler_act)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(pooled))


def pool(x: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """The class token, or the mean of the patch tokens (`config.pooling_type`)."""
    if config.pooling_type == "mean":
        return x[:, config.num_prefix_tokens :].mean(dim=1)
    return x[:, 0]


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

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> Any:
        """Load a canonical folder into this class (strict: every key must match)."""
        from vit_core.loading import load

        classification = issubclass(cls, ViTForImageClassification)
        model_type = "classification" if classification else "base"
        model_class = cls if issubclass(cls, ViTModel | ViTForImageClassification) else ViTModel
        return load(
            folder, backend="torch", model_type=model_type, model_class=model_class, **kwargs
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` + `config.json` in the canonical layout."""
        from vit_core.loading import save_folder
        from vit_torch.weights import internal_weights

        return save_folder(folder, self.config, internal_weights(self), self.kind)


class ViTModel(ViTPreTrainedModel):
    """The encoder: `last_hidden_state` and, with a pooling layer, `pooler_output`."""

    def __init__(
        self, config: ViTConfig, add_pooling_layer: bool = True, seed: int | None = None
    ) -> None:
        super().__init__(config)
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.init_weights(seed)

    @property
    def kind(self) -> ModelKind:
        return ModelKind(classifier=False, pooler=self.pooler is not None)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        self.config.check_pixel_shape(tuple(pixel_values.shape), interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.layernorm.weight.dtype)
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        x, hidden_states, attentions = self.encoder(x, output_attentions, output_hidden_states)
        x = self.layernorm(x)
        pooled = self.pooler(pool(x, self.config)) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(x, pooled, hidden_states, attentions)
        return out if return_dict else out.to_tuple()


class ViTForImageClassification(ViTPreTrainedModel):
    """ViT + a linear classifier on the pooled token (or on the pooler, if the config says)."""

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
        features = (
            base.pooler_output
            if self.config.classifier_uses_pooler
            else pool(base.last_hidden_state, self.config)
        )
        logits = self.classifier(features)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        out = ImageClassifierOutput(loss, logits, base.hidden_states, base.attentions)
        return out if return_dict else out.to_tuple()


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
