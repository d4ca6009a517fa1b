"""ViT in Flax. The PyTorch twin (`vit_torch/modeling.py`) has the same blocks in the same order.

Linen modules hold the architecture; `FlaxViTModel` and `FlaxViTForImageClassification`
hold a module, its params (a pytree) and a jitted forward, and are called like
transformers' Flax models: `model(pixel_values)` with NCHW input. Params mirror the
twin's internal names (`layers.3.attention.qkv.weight` -> `layers_3/attention/qkv/kernel`),
transposed to Flax's (in, out) and HWIO conventions on load, never on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from vit_core.config import TANH_GELU, ViTConfig
from vit_core.initialization import TRUNCATED_NORMAL_STD, initial_weights
from vit_core.layout import ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from vit_core.resample import grid_resize_matrices, interpolation_mode

for _record in (BaseModelOutputWithPooling, ImageClassifierOutput):
    jax.tree_util.register_dataclass(
        _record, data_fields=[f for f in _record.__dataclass_fields__], meta_fields=[]
    )

Array = jax.Array


def activation(name: str) -> Callable[[Array], Array]:
    """transformers' ACT2FN names -> functions (validated by `ViTConfig`)."""
    if name == "gelu":
        return partial(jax.nn.gelu, approximate=False)
    if name in TANH_GELU:
        return partial(jax.nn.gelu, approximate=True)
    if name == "quick_gelu":
        return _quick_gelu
    return {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu, "tanh": jnp.tanh}[name]


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _truncated_normal(config: ViTConfig) -> nn.initializers.Initializer:
    """linen's twin of `vit_core.initialization.truncated_normal`: std `initializer_range`.

    jax's `truncated_normal(s)` draws with std 0.88 s (its s is the untruncated normal's).
    """
    return nn.initializers.truncated_normal(config.initializer_range / TRUNCATED_NORMAL_STD)


def _dense(
    features: int, config: ViTConfig, dtype: Any, name: str, use_bias: bool = True
) -> nn.Dense:
    init = _truncated_normal(config)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=init, name=name)


def _layer_norm(config: ViTConfig, dtype: Any, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2], as PyTorch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name
    )


class ViTEmbeddings(nn.Module):
    """Patches -> tokens: stride-P convolution, class token, position embeddings, dropout."""

    config: ViTConfig
    dtype: Any = jnp.float32

    def positions_for(self, table: Array, grid: tuple[int, int], interpolation: str) -> Array:
        """Position embeddings for a `grid` of patches, resampled when it differs from training."""
        if grid == self.config.grid_hw:
            return table
        prefix = self.config.num_prefix_tokens
        rows, cols = (
            jnp.asarray(m, table.dtype)
            for m in grid_resize_matrices(self.config.grid_hw, grid, interpolation)
        )
        patches = table[0, prefix:].reshape(*self.config.grid_hw, -1)
        resized = jnp.einsum("ah,bw,hwd->abd", rows, cols, patches).reshape(1, -1, table.shape[-1])
        return jnp.concatenate([table[:, :prefix], resized], axis=1)

    @nn.compact
    def __call__(
        self, pixels_nhwc: Array, interpolate_pos_encoding: bool | str, deterministic: bool
    ) -> Array:
        config, dim = self.config, self.config.hidden_size
        init = _truncated_normal(config)
        patch = config.patch_hw
        x = nn.Conv(
            dim,
            patch,
            strides=patch,
            padding="VALID",
            dtype=self.dtype,
            kernel_init=init,
            name="patch_embeddings",
        )(pixels_nhwc)
        batch, grid = x.shape[0], (x.shape[1], x.shape[2])
        x = x.reshape(batch, -1, dim)
        if config.use_class_token:
            cls_token = self.param("cls_token", init, (1, 1, dim))
            x = jnp.concatenate(
                [jnp.broadcast_to(cls_token, (batch, 1, dim)).astype(x.dtype), x], axis=1
            )
        table = self.param("position_embeddings", init, (1, config.num_positions, dim))
        if interpolate_pos_encoding:
            table = self.positions_for(table, grid, interpolation_mode(interpolate_pos_encoding))
        x = x + table.astype(x.dtype)
        return nn.Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)


class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> tuple[Array, Array]:
        config = self.config
        batch, tokens, dim = x.shape
        qkv = _dense(3 * dim, config, self.dtype, "qkv", use_bias=config.qkv_bias)(x)
        qkv = qkv.reshape(batch, tokens, 3, config.num_attention_heads, -1)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * config.head_dim**-0.5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(batch, tokens, dim)
        out = _dense(dim, config, self.dtype, "proj")(out)
        return nn.Dropout(config.hidden_dropout_prob)(out, deterministic=deterministic), probs


class ViTMlp(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        config = self.config
        x = activation(config.hidden_act)(
            _dense(config.intermediate_size, config, self.dtype, "fc1")(x)
        )
        x = _dense(config.hidden_size, config, self.dtype, "fc2")(x)
        return nn.Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)


class ViTLayer(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then x + mlp(norm2(x))."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> tuple[Array, Array]:
        config, dtype = self.config, self.dtype
        attended, probs = ViTAttention(config, dtype, name="attention")(
            _layer_norm(config, dtype, "norm1")(x), deterministic
        )
        x = x + attended
        return x + ViTMlp(config, dtype, name="mlp")(
            _layer_norm(config, dtype, "norm2")(x), deterministic
        ), probs


class ViTEncoder(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool, output_attentions: bool, output_hidden_states: bool
    ) -> tuple[Array, tuple[Array, ...] | None, tuple[Array, ...] | None]:
        hidden_states, attentions = [x], []
        for i in range(self.config.num_hidden_layers):
            x, probs = ViTLayer(self.config, self.dtype, name=f"layers_{i}")(x, deterministic)
            hidden_states.append(x)
            attentions.append(probs)
        return (
            x,
            tuple(hidden_states) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )


class ViTPooler(nn.Module):
    """Dense + activation over the pooled token (the JAX `pre_logits` layer)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        config = self.config
        return activation(config.pooler_act)(
            _dense(config.pooler_output_size, config, self.dtype, "dense")(pooled)
        )


def pool(x: Array, config: ViTConfig) -> Array:
    """The class token, or the mean of the patch tokens (`config.pooling_type`)."""
    if config.pooling_type == "mean":
        return x[:, config.num_prefix_tokens :].mean(axis=1)
    return x[:, 0]


class ViTModule(nn.Module):
    """The encoder: `last_hidden_state` and, with a pooling layer, `pooler_output`."""

    config: ViTConfig
    add_pooling_layer: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        pixels_nhwc: Array,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> BaseModelOutputWithPooling:
        config, dtype = self.config, self.dtype
        x = ViTEmbeddings(config, dtype, name="embeddings")(
            pixels_nhwc, interpolate_pos_encoding, deterministic
        )
        x, hidden_states, attentions = ViTEncoder(config, dtype, name="encoder")(
            x, deterministic, output_attentions, output_hidden_states
        )
        x = _layer_norm(config, dtype, "layernorm")(x)
        pooled = (
            ViTPooler(config, dtype, name="pooler")(pool(x, config))
            if self.add_pooling_layer
            else None
        )
        return BaseModelOutputWithPooling(x, pooled, hidden_states, attentions)


class ViTForImageClassificationModule(nn.Module):
    """ViT + a linear classifier on the pooled token (or on the pooler, if the config says)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        pixels_nhwc: Array,
        labels: Array | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> ImageClassifierOutput:
        config = self.config
        base = ViTModule(config, config.classifier_uses_pooler, self.dtype, name="vit")(
            pixels_nhwc,
            deterministic,
            output_attentions,
            output_hidden_states,
            interpolate_pos_encoding,
        )
        features = (
            base.pooler_output
            if config.classifier_uses_pooler
            else pool(base.last_hidden_state, config)
        )
        logits = (
            _dense(config.num_labels, config, self.dtype, "classifier")(features)
            if config.num_labels
            else features
        )
        loss = classification_loss(logits, labels, config) if labels is not None else None
        return ImageClassifierOutput(loss, logits, base.hidden_states, base.attentions)


def classification_loss(logits: Array, labels: Array, config: ViTConfig) -> Array:
    """transformers' loss by problem type: MSE, cross-entropy, or binary cross-entropy."""
    problem = config.resolved_problem_type(jnp.issubdtype(labels.dtype, jnp.integer))
    logits32 = logits.astype(jnp.float32)
    if problem == "regression":
        if config.num_labels == 1:
            return jnp.mean((jnp.squeeze(logits32) - jnp.squeeze(labels)) ** 2)
        return jnp.mean((logits32 - labels) ** 2)
    if problem == "single_label_classification":
        return optax.softmax_cross_entropy_with_integer_labels(
            logits32.reshape(-1, config.num_labels), labels.reshape(-1)
        ).mean()
    return optax.sigmoid_binary_cross_entropy(logits32, labels.astype(jnp.float32)).mean()


class FlaxViTPreTrainedModel:
    """A module with its params and a jitted forward; called like transformers' Flax models."""

    module: nn.Module
    kind: ModelKind

    def __init__(
        self, config: ViTConfig, module: nn.Module, seed: int = 0, _do_init: bool = True
    ) -> None:
        self.config = config
        self.module = module
        self.params: Any = self.init_weights(seed) if _do_init else None

        def forward(variables: Any, pixel_values: Array, rngs: Any, **kwargs: Any) -> Any:
            # NCHW -> NHWC inside the jit, where XLA fuses it into the patch convolution.
            pixels = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(module.dtype)
            return module.apply(variables, pixels, rngs=rngs, **kwargs)

        self._apply = jax.jit(
            forward,
            static_argnames=(
                "deterministic",
                "output_attentions",
                "output_hidden_states",
                "interpolate_pos_encoding",
            ),
        )

    def init_weights(self, seed: int) -> Any:
        """Fresh params: truncated normal(initializer_range) weights, zero biases, unit norms.

        Drawn by `vit_core.initialization.initial_weights`: the twin's `init_weights(seed)`
        gives the same numbers (float32 params, whatever the compute dtype).
        """
        from vit_flax.weights import params_from_internal

        return params_from_internal(initial_weights(self.config, self.kind, seed))

    def _run(
        self,
        pixel_values: Any,
        params: Any,
        dropout_rng: Array | None,
        train: bool,
        interpolate_pos_encoding: bool | str,
        **kwargs: Any,
    ) -> Any:
        self.config.check_pixel_shape(tuple(np.shape(pixel_values)), interpolate_pos_encoding)
        if train and dropout_rng is None and self._has_dropout:
            raise ValueError("train=True with dropout in the config needs a dropout_rng")
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        return self._apply(
            {"params": self.params if params is None else params},
            pixel_values,
            rngs,
            deterministic=not train,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **kwargs,
        )

    @property
    def _has_dropout(self) -> bool:
        return self.config.hidden_dropout_prob > 0 or self.config.attention_probs_dropout_prob > 0

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> Any:
        """Load a canonical folder into this class (strict: every key must match)."""
        from vit_core.loading import load

        classification = issubclass(cls, FlaxViTForImageClassification)
        model_type = "classification" if classification else "base"
        model_class = (
            cls if issubclass(cls, FlaxViTModel | FlaxViTForImageClassification) else FlaxViTModel
        )
        return load(
            folder, backend="flax", model_type=model_type, model_class=model_class, **kwargs
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` + `config.json` in the canonical layout."""
        from vit_core.loading import save_folder
        from vit_flax.weights import internal_weights

        return save_folder(folder, self.config, internal_weights(self.params), self.kind)


class FlaxViTModel(FlaxViTPreTrainedModel):
    def __init__(
        self,
        config: ViTConfig,
        add_pooling_layer: bool = True,
        seed: int = 0,
        dtype: Any = jnp.float32,
        _do_init: bool = True,
    ) -> None:
        self.kind = ModelKind(classifier=False, pooler=add_pooling_layer)
        super().__init__(config, ViTModule(config, add_pooling_layer, dtype), seed, _do_init)

    def __call__(
        self,
        pixel_values: Any,
        params: Any = None,
        dropout_rng: Array | None = None,
        train: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        out = self._run(
            pixel_values,
            params,
            dropout_rng,
            train,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return out if return_dict else out.to_tuple()


class FlaxViTForImageClassification(FlaxViTPreTrainedModel):
    def __init__(
        self, config: ViTConfig, seed: int = 0, dtype: Any = jnp.float32, _do_init: bool = True
    ) -> None:
        self.kind = ModelKind(classifier=True, pooler=config.classifier_uses_pooler)
        super().__init__(config, ViTForImageClassificationModule(config, dtype), seed, _do_init)

    def __call__(
        self,
        pixel_values: Any,
        labels: Any = None,
        params: Any = None,
        dropout_rng: Array | None = None,
        train: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> ImageClassifierOutput | tuple[Any, ...]:
        out = self._run(
            pixel_values,
            params,
            dropout_rng,
            train,
            interpolate_pos_encoding,
            labels=None if labels is None else jnp.asarray(labels),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return out if return_dict else out.to_tuple()
