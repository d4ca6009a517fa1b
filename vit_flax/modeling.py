"""ViT in Flax. The PyTorch twin (`vit_torch/modeling.py`) has the same blocks in the same order.

Linen modules hold the architecture; `FlaxViTModel`, `FlaxViTForImageClassification` and
`FlaxViTForMaskedImageModeling` hold a module, its params (a pytree) and a jitted
forward, and are called like transformers' Flax models: `model(pixel_values)` with NCHW
input (and NCHW `reconstruction` out). Params mirror the
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
from vit_core.intermediates import Indices, arrange, check_output_fmt, patch_grid, take_indices
from vit_core.layout import MASKED_IMAGE_MODELING, MIM_KIND, ModelKind
from vit_core.masking import check_bool_masked_pos, check_reconstruction_loss
from vit_core.outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from vit_core.resample import grid_resize_matrices, interpolation_mode

for _record in (BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput):
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


def _split(rng: Array | None, count: int) -> list[Array | None]:
    """`count` keys from `rng` for the dropout sites of one module, or `count` Nones: each
    site then draws from the "dropout" rng stream itself."""
    return [None] * count if rng is None else list(jax.random.split(rng, count))


def _layer_norm(config: ViTConfig, dtype: Any, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2], as PyTorch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name
    )


class ViTEmbeddings(nn.Module):
    """Patches -> tokens: stride-P convolution, the mask token in place of the masked
    patches (`use_mask_token`, masked image modeling), the prefix tokens (class,
    distillation, registers), position embeddings, dropout (docs/families.md gives the
    order)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    use_mask_token: bool = False

    def positions_for(self, table: Array, grid: tuple[int, int], interpolation: str) -> Array:
        """Position embeddings for a `grid` of patches, resampled when it differs from training."""
        if grid == self.config.grid_hw:
            return table
        prefix = self.config.num_position_prefix
        rows, cols = (
            jnp.asarray(m, table.dtype)
            for m in grid_resize_matrices(self.config.grid_hw, grid, interpolation)
        )
        patches = table[0, prefix:].reshape(*self.config.grid_hw, -1)
        resized = jnp.einsum("ah,bw,hwd->abd", rows, cols, patches).reshape(1, -1, table.shape[-1])
        return jnp.concatenate([table[:, :prefix], resized], axis=1)

    @nn.compact
    def __call__(
        self,
        pixels_nhwc: Array,
        bool_masked_pos: Array | None,
        interpolate_pos_encoding: bool | str,
        deterministic: bool,
    ) -> Array:
        config, dim = self.config, self.config.hidden_size
        init = _truncated_normal(config)
        patch = config.patch_hw
        x = nn.Conv(
            dim,
            patch,
            strides=patch,
            padding="VALID",
            use_bias=config.patch_embedding_bias,
            dtype=self.dtype,
            kernel_init=init,
            name="patch_embeddings",
        )(pixels_nhwc)
        batch, grid = x.shape[0], (x.shape[1], x.shape[2])
        x = x.reshape(batch, -1, dim)
        mask_token = (  # transformers starts it at zero
            self.param("mask_token", nn.initializers.zeros, (1, 1, dim))
            if self.use_mask_token
            else None
        )
        if bool_masked_pos is not None:  # transformers' blend: exact for a 0/1 mask
            check_bool_masked_pos(bool_masked_pos.shape, batch, grid, mask_token is not None)
            assert mask_token is not None  # checked
            mask = bool_masked_pos[..., None].astype(x.dtype)
            x = x * (1.0 - mask) + mask_token.astype(x.dtype) * mask
        tokens = []
        if config.use_class_token:
            tokens.append(self.param("cls_token", init, (1, 1, dim)))
        if config.use_distillation_token:
            tokens.append(self.param("distillation_token", init, (1, 1, dim)))
        if config.num_register_tokens:
            tokens.append(self.param("register_tokens", init, (1, config.num_register_tokens, dim)))
        table = self.param("position_embeddings", init, (1, config.num_positions, dim))
        if interpolate_pos_encoding:
            table = self.positions_for(table, grid, interpolation_mode(interpolate_pos_encoding))
        positions = table.astype(x.dtype)
        prefix = [jnp.broadcast_to(t, (batch, *t.shape[1:])).astype(x.dtype) for t in tokens]
        if config.no_embed_class:
            x = jnp.concatenate([*prefix, x + positions], axis=1)
        else:
            x = jnp.concatenate([*prefix, x], axis=1) + positions
        return nn.Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)


class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool, rng: Array | None = None
    ) -> tuple[Array, Array]:
        config = self.config
        probs_rng, out_rng = _split(rng, 2)
        batch, tokens, dim = x.shape
        qkv = _dense(3 * dim, config, self.dtype, "qkv", use_bias=config.qkv_bias)(x)
        qkv = qkv.reshape(batch, tokens, 3, config.num_attention_heads, -1)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * config.head_dim**-0.5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic, probs_rng)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(batch, tokens, dim)
        out = _dense(dim, config, self.dtype, "proj")(out)
        return nn.Dropout(config.hidden_dropout_prob)(out, deterministic, out_rng), probs


class ViTMlp(nn.Module):
    """fc1, activation, fc2; `gated`: fc1 gives two halves, activation(first) * second
    (SwiGLU, `use_swiglu_ffn`)."""

    config: ViTConfig
    gated: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, rng: Array | None = None) -> Array:
        config, width = self.config, self.config.intermediate_size
        x = _dense(2 * width if self.gated else width, config, self.dtype, "fc1")(x)
        if self.gated:
            gate, x = jnp.split(x, 2, axis=-1)
            x = activation(config.hidden_act)(gate) * x
        else:
            x = activation(config.hidden_act)(x)
        x = _dense(config.hidden_size, config, self.dtype, "fc2")(x)
        return nn.Dropout(config.hidden_dropout_prob)(x, deterministic, rng)


class ViTLayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT, DeiT-3, DINOv2)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.constant(self.config.layerscale_value or 0.0)
        gamma = self.param("gamma", init, (self.config.hidden_size,))
        return x * gamma.astype(self.dtype)


class ViTDropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016), as timm's `DropPath`: in training, each
    sample's residual branch is zeroed with probability `rate` and kept ones are scaled by
    1 / (1 - rate), so the expected output is unchanged; the identity when deterministic
    and at rate 0. `rate` may be traced (a scanned block's, `ViTEncoder`); the mask comes
    from `rng`, else from the "dropout" rng stream, as dropout's does."""

    rate: float | Array

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, rng: Array | None = None) -> Array:
        if deterministic or (isinstance(self.rate, float) and self.rate == 0.0):
            return x
        keep = 1.0 - jnp.asarray(self.rate, jnp.float32)
        rng = self.make_rng("dropout") if rng is None else rng
        kept = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(kept, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class ViTLayer(nn.Module):
    """Pre-norm block: x + drop_path(ls1(attention(norm1(x)))), then
    x + drop_path(ls2(mlp(norm2(x)))); `drop_path_rate` is this block's
    (`ViTConfig.drop_path_rates`). `rng`, when given, is the source of every mask the
    block draws (the encoder's per-block key, so a scanned and an unrolled block draw the
    same ones)."""

    config: ViTConfig
    drop_path_rate: float | Array = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool, rng: Array | None = None
    ) -> tuple[Array, Array]:
        config, dtype = self.config, self.dtype
        attention_rng, mlp_rng, drop_rng1, drop_rng2 = _split(rng, 4)
        scaled = config.layerscale_value is not None
        attended, probs = ViTAttention(config, dtype, name="attention")(
            _layer_norm(config, dtype, "norm1")(x), deterministic, attention_rng
        )
        if scaled:
            attended = ViTLayerScale(config, dtype, name="ls1")(attended)
        drop_path1 = ViTDropPath(self.drop_path_rate, name="drop_path1")
        x = x + drop_path1(attended, deterministic, drop_rng1)
        mlp_out = ViTMlp(config, config.use_swiglu_ffn, dtype, name="mlp")(
            _layer_norm(config, dtype, "norm2")(x), deterministic, mlp_rng
        )
        if scaled:
            mlp_out = ViTLayerScale(config, dtype, name="ls2")(mlp_out)
        mlp_out = ViTDropPath(self.drop_path_rate, name="drop_path2")(
            mlp_out, deterministic, drop_rng2
        )
        return x + mlp_out, probs


class ViTEncoder(nn.Module):
    """The blocks, each stored as its own `layers_{i}` params.

    `gradient_checkpointing`: under `jax.grad` each block keeps only its input and runs
    again in the backward pass. The blocks then run as one `lax.scan` over their params,
    stacked inside the step (the stored names stay), with `jax.checkpoint` on the step:
    unrolled, XLA's CPU compiler drops the optimization barriers that keep a recomputation
    apart and merges it with the forward's (a 12-block stack compiled to the same
    temporaries with and without `jax.checkpoint`), while a loop body can only run one
    block at a time. Every block draws its masks from its own key (`fold_in` of the
    encoder's "dropout" rng with the block's index) in both forms, so a checkpointed step
    draws what an unrolled one does."""

    config: ViTConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        deterministic: bool,
        output_attentions: bool,
        output_hidden_states: bool,
        num_layers: int | None = None,
    ) -> tuple[Array, tuple[Array, ...] | None, tuple[Array, ...] | None]:
        """The blocks in order: the first `num_layers` of them when given (what
        `forward_intermediates(stop_early=True)` runs; the later blocks' params go unread),
        else all."""
        count = self.config.num_hidden_layers if num_layers is None else num_layers
        # Without a rate above 0 training is deterministic, and needs no "dropout" rng.
        deterministic = deterministic or not self.config.draws_masks
        keys = None
        if not deterministic and count:
            rng = self.make_rng("dropout")
            keys = jnp.stack([jax.random.fold_in(rng, i) for i in range(count)])
        if self.gradient_checkpointing and count and not self.is_initializing():
            y, outputs, attentions = self._scan(
                x, deterministic, count, keys, output_hidden_states, output_attentions
            )
        else:
            y, outputs, attentions = x, [], []
            for i in range(count):
                rate = self.config.drop_path_rates[i]
                y, probs = ViTLayer(self.config, rate, self.dtype, name=f"layers_{i}")(
                    y, deterministic, None if keys is None else keys[i]
                )
                outputs.append(y)
                attentions.append(probs)
        return (
            y,
            (x, *outputs) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )

    def _scan(
        self,
        x: Array,
        deterministic: bool,
        count: int,
        keys: Array | None,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> tuple[Array, list[Array], list[Array]]:
        """The last block's output and, where asked, each block's output and attention
        probabilities, from a checkpointed scan (what is not asked is not kept)."""
        params = self.variables["params"]
        stacked = jax.tree.map(
            lambda *leaves: jnp.stack(leaves), *(params[f"layers_{i}"] for i in range(count))
        )
        # Traced rates only where they differ from 0 (a rate of 0 skips the draw).
        rates = None
        if self.config.drop_path_rate > 0:
            rates = jnp.asarray(self.config.drop_path_rates[:count], jnp.float32)

        def step(y: Array, block: tuple[Any, Array | None, Array | None]) -> tuple[Array, Any]:
            weights, rate, key = block
            layer = ViTLayer(self.config, 0.0 if rate is None else rate, self.dtype)
            y, probs = layer.apply({"params": weights}, y, deterministic, key)
            return y, (y if output_hidden_states else None, probs if output_attentions else None)

        # In a loop body the forward's values cannot be reused by mistake: no CSE barrier.
        step = jax.checkpoint(step, prevent_cse=False)
        y, (outputs, attentions) = jax.lax.scan(step, x, (stacked, rates, keys))
        return y, _unstacked(outputs), _unstacked(attentions)


def _unstacked(stacked: Array | None) -> list[Array]:
    """A scan's stacked per-block outputs as a list (none when it kept none)."""
    return [] if stacked is None else list(stacked)


class ViTProbeAttention(nn.Module):
    """Attention from one learned probe to every token: the query projection reads the
    probe, key and value the tokens (rows 0:D, D:2D, 2D:3D of one fused projection, as
    `nn.MultiheadAttention` stores them)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, probe: Array, x: Array) -> Array:
        config = self.config
        batch, tokens, dim = x.shape
        heads = config.num_attention_heads
        qkv = _dense(3 * dim, config, self.dtype, "qkv")
        q = qkv(probe)[..., :dim].reshape(batch, 1, heads, -1).transpose(0, 2, 1, 3)
        kv = qkv(x)[..., dim:].reshape(batch, tokens, 2, heads, -1)
        k, v = jnp.transpose(kv, (2, 0, 3, 1, 4))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * config.head_dim**-0.5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(batch, 1, dim)
        return _dense(dim, config, self.dtype, "proj")(out)


class ViTMAPHead(nn.Module):
    """Multihead attention pooling (big_vision `MAPHead`, SigLIP): a learned probe attends
    to the patch tokens (prefix tokens excluded, as timm's `AttentionPoolLatent` is fed),
    then a residual MLP; the image embedding is the probe's output."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        config, dtype = self.config, self.dtype
        x = x[:, config.num_prefix_tokens :]
        probe = self.param("probe", _truncated_normal(config), (1, 1, config.hidden_size))
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, config.hidden_size)).astype(x.dtype)
        h = ViTProbeAttention(config, dtype, name="attention")(probe, x)
        h = h + ViTMlp(config, False, dtype, name="mlp")(
            _layer_norm(config, dtype, "norm")(h), deterministic
        )
        return h[:, 0]


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


class ViTMIMDecoder(nn.Module):
    """SimMIM's one-layer decoder: a 1x1 convolution from each patch token to
    `encoder_stride**2 * num_channels` values, unfolded as PixelShuffle does into an
    `encoder_stride` x `encoder_stride` block of pixels (transformers' `decoder`)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches: Array, grid: tuple[int, int]) -> Array:
        """(B, L, D) patch tokens of a `grid` of patches -> (B, C, rows * s, cols * s)."""
        config, stride = self.config, self.config.encoder_stride
        channels, (rows, cols) = config.num_channels, grid
        x = patches.reshape(patches.shape[0], rows, cols, -1)
        x = nn.Conv(
            stride**2 * channels,
            (1, 1),
            dtype=self.dtype,
            kernel_init=_truncated_normal(config),
            name="projection",
        )(x)
        # PixelShuffle: output channel c, row r * s + i, column q * s + j reads input
        # channel (c * s + i) * s + j at (r, q).
        x = x.reshape(x.shape[0], rows, cols, channels, stride, stride)
        x = jnp.transpose(x, (0, 3, 1, 4, 2, 5))
        return x.reshape(x.shape[0], channels, rows * stride, cols * stride)


def pool(x: Array, config: ViTConfig) -> Array:
    """The class token, or the mean of the patch tokens (`config.pooling_type` cls / mean)."""
    if config.pooling_type == "mean":
        return x[:, config.num_prefix_tokens :].mean(axis=1)
    return x[:, 0]


def unpooled(embedding: Array, config: ViTConfig) -> Array | None:
    """`pooler_output` of a model without a pooling layer: None for a transformers ViT
    (its `ViTModel(add_pooling_layer=False)` returns none), else the family's image
    embedding, as its transformers class returns it (DINOv2, CLIP, SigLIP)."""
    return None if config.transformers_compatible else embedding


def _layer_norm_if(condition: bool, config: ViTConfig, dtype: Any, name: str) -> nn.Module | None:
    """A LayerNorm over the width where the config has one, else None."""
    return _layer_norm(config, dtype, name) if condition else None


class ViTModule(nn.Module):
    """The encoder: `last_hidden_state` (every token) and `pooler_output` (the pooling
    layer's output where there is one, else the image embedding: docs/families.md).

    `use_mask_token` (transformers' name) adds the mask token that `bool_masked_pos`
    puts in place of the masked patches.

    Its submodules are made in `setup`, not inline: `__call__` and `intermediates` run
    the same ones (linen shares submodules between two methods only that way)."""

    config: ViTConfig
    add_pooling_layer: bool = True
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    use_mask_token: bool = False

    def setup(self) -> None:
        config, dtype = self.config, self.dtype
        self.embeddings = ViTEmbeddings(
            config, dtype, use_mask_token=self.use_mask_token, name="embeddings"
        )
        self.norm_pre = _layer_norm_if(config.use_pre_norm, config, dtype, "norm_pre")
        self.encoder = ViTEncoder(config, dtype, self.gradient_checkpointing, name="encoder")
        self.layernorm = _layer_norm_if(config.has_token_norm, config, dtype, "layernorm")
        self.head = ViTMAPHead(config, dtype, name="head") if config.pooling_type == "map" else None
        self.fc_norm = _layer_norm_if(
            config.use_final_norm and config.use_fc_norm, config, dtype, "fc_norm"
        )
        self.pooler = ViTPooler(config, dtype, name="pooler") if self.add_pooling_layer else None

    def __call__(
        self,
        pixels_nhwc: Array,
        bool_masked_pos: Array | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> BaseModelOutputWithPooling:
        x, hidden_states, attentions = self._encode(
            pixels_nhwc,
            interpolate_pos_encoding,
            deterministic,
            output_attentions,
            output_hidden_states,
            bool_masked_pos=bool_masked_pos,
        )
        x = self._token_norm(x)
        embedding = pool(x, self.config) if self.head is None else self.head(x, deterministic)
        if self.fc_norm is not None:
            embedding = self.fc_norm(embedding)
        pooled = unpooled(embedding, self.config) if self.pooler is None else self.pooler(embedding)
        return BaseModelOutputWithPooling(x, pooled, hidden_states, attentions)

    def intermediates(
        self,
        pixels_nhwc: Array,
        take: tuple[int, ...],
        num_layers: int | None,
        norm: bool,
        interpolate_pos_encoding: bool | str,
    ) -> tuple[Array, list[Array]]:
        """The final-normed tokens of the last block run (`num_layers` of them: all when
        None) and the (B, T, D) outputs of the blocks `take`, normed too if `norm`; the
        wrappers' `forward_intermediates` lays them out as timm's."""
        x, hidden_states, _ = self._encode(
            pixels_nhwc, interpolate_pos_encoding, True, False, True, num_layers
        )
        assert hidden_states is not None  # asked for
        states = [hidden_states[i + 1] for i in take]  # [0] is the embeddings' output
        if norm:
            states = [self._token_norm(s) for s in states]
        return self._token_norm(x), states

    def _encode(
        self,
        pixels_nhwc: Array,
        interpolate_pos_encoding: bool | str,
        deterministic: bool,
        output_attentions: bool,
        output_hidden_states: bool,
        num_layers: int | None = None,
        bool_masked_pos: Array | None = None,
    ) -> tuple[Array, tuple[Array, ...] | None, tuple[Array, ...] | None]:
        """What `__call__` and `intermediates` share: embeddings (masked where
        `bool_masked_pos` says), pre-norm and the encoder's blocks (`num_layers` of them:
        `ViTEncoder`), before the final norm."""
        x = self.embeddings(pixels_nhwc, bool_masked_pos, interpolate_pos_encoding, deterministic)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return self.encoder(x, deterministic, output_attentions, output_hidden_states, num_layers)

    def _token_norm(self, x: Array) -> Array:
        """The final norm over every token, where the config has one."""
        return x if self.layernorm is None else self.layernorm(x)


class ViTForImageClassificationModule(nn.Module):
    """ViT + a linear classifier on the image embedding (or on the pooler, if the config
    says); a distilled model (DeiT) has a second head on the distillation token."""

    config: ViTConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

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
        base = ViTModule(
            config,
            config.classifier_uses_pooler,
            self.dtype,
            self.gradient_checkpointing,
            name="vit",
        )(
            pixels_nhwc,
            deterministic=deterministic,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        cls_logits = distillation_logits = None
        features = base.pooler_output
        if features is None:
            features = pool(base.last_hidden_state, config)
        if not config.num_labels:
            logits = features
        elif config.use_distillation_token:
            tokens = base.last_hidden_state
            cls_logits = _dense(config.num_labels, config, self.dtype, "classifier")(tokens[:, 0])
            distillation_logits = _dense(
                config.num_labels, config, self.dtype, "distillation_classifier"
            )(tokens[:, 1])
            logits = (cls_logits + distillation_logits) / 2
        else:
            logits = _dense(config.num_labels, config, self.dtype, "classifier")(features)
        loss = classification_loss(logits, labels, config) if labels is not None else None
        return ImageClassifierOutput(
            loss,
            logits,
            base.hidden_states,
            base.attentions,
            cls_logits,
            distillation_logits,
        )


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


class ViTForMaskedImageModelingModule(nn.Module):
    """SimMIM (Xie et al., 2022) as transformers has it: the encoder with a mask token and
    no pooler, and a one-layer decoder from every patch token back to its pixels; with
    `bool_masked_pos`, the L1 reconstruction loss over the masked patches."""

    config: ViTConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        pixels_nhwc: Array,
        bool_masked_pos: Array | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> MaskedImageModelingOutput:
        config = self.config
        if bool_masked_pos is not None:
            check_reconstruction_loss(config)
        base = ViTModule(
            config,
            add_pooling_layer=False,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            use_mask_token=True,
            name="vit",
        )(
            pixels_nhwc,
            bool_masked_pos,
            deterministic=deterministic,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        pixel_values = jnp.transpose(pixels_nhwc, (0, 3, 1, 2))  # XLA folds it into the loss
        patches = base.last_hidden_state[:, config.num_prefix_tokens :]
        reconstruction = ViTMIMDecoder(config, self.dtype, name="decoder")(
            patches, patch_grid(config.patch_hw, pixel_values.shape)
        )
        loss = None
        if bool_masked_pos is not None:
            loss = masked_image_modeling_loss(pixel_values, reconstruction, bool_masked_pos, config)
        return MaskedImageModelingOutput(loss, reconstruction, base.hidden_states, base.attentions)


def masked_image_modeling_loss(
    pixel_values: Array, reconstruction: Array, bool_masked_pos: Array, config: ViTConfig
) -> Array:
    """SimMIM's loss as transformers computes it: the L1 error summed over the masked
    patches' pixels, divided by their count (+ 1e-5, so that an empty mask gives 0, not
    nan) and by the channels, i.e. the mean absolute error per masked pixel value."""
    ph, pw = config.patch_hw
    grid = patch_grid(config.patch_hw, pixel_values.shape)
    mask = jnp.repeat(jnp.repeat(bool_masked_pos.reshape(-1, *grid), ph, axis=1), pw, axis=2)
    mask = mask[:, None].astype(jnp.float32)  # (B, 1, H, W): one entry per pixel, every channel
    error = jnp.abs(pixel_values.astype(jnp.float32) - reconstruction.astype(jnp.float32))
    return (error * mask).sum() / (mask.sum() + 1e-5) / config.num_channels


# The linen module a wrapper (below) holds.
ModelModule = ViTModule | ViTForImageClassificationModule | ViTForMaskedImageModelingModule


def _nhwc(pixel_values: Array, dtype: Any) -> Array:
    """NCHW -> NHWC inside the jit, where XLA fuses it into the patch convolution."""
    return jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(dtype)


class FlaxViTPreTrainedModel:
    """A module with its params and a jitted forward; called like transformers' Flax models."""

    module: ModelModule
    kind: ModelKind

    def __init__(
        self,
        config: ViTConfig,
        module: ModelModule,
        seed: int = 0,
        _do_init: bool = True,
    ) -> None:
        self.config = config
        self.params: Any = self.init_weights(seed) if _do_init else None
        self._set_module(module)

    def _set_module(self, module: ModelModule) -> None:
        """Hold `module` and jit its forward and its encoder's `intermediates` (linen modules
        are frozen: another setting, such as gradient checkpointing, is another module)."""
        config = self.config
        self.module = module

        def forward(variables: Any, pixel_values: Array, rngs: Any, **kwargs: Any) -> Any:
            return module.apply(variables, _nhwc(pixel_values, module.dtype), rngs=rngs, **kwargs)

        self._apply = jax.jit(
            forward,
            static_argnames=(
                "deterministic",
                "output_attentions",
                "output_hidden_states",
                "interpolate_pos_encoding",
            ),
        )
        # forward_intermediates runs the encoder alone: a classifier's is its `vit` part.
        encoder = (
            module
            if isinstance(module, ViTModule)
            else ViTModule(
                config, config.classifier_uses_pooler, module.dtype, module.gradient_checkpointing
            )
        )

        def intermediates(
            encoder_params: Any,
            pixel_values: Array,
            nchw: bool,
            return_prefix_tokens: bool,
            **kwargs: Any,
        ) -> tuple[Array, list[Any]]:
            pixels = _nhwc(pixel_values, encoder.dtype)
            final, states = encoder.apply(
                {"params": encoder_params}, pixels, method=ViTModule.intermediates, **kwargs
            )
            grid = patch_grid(config.patch_hw, pixel_values.shape)

            def to_map(y: Array) -> Array:
                return jnp.transpose(y.reshape(y.shape[0], *grid, -1), (0, 3, 1, 2))

            layout = arrange(
                list(states),
                config.num_prefix_tokens,
                to_map if nchw else None,
                return_prefix_tokens,
            )
            return final, layout

        self._intermediates = jax.jit(
            intermediates,
            static_argnames=(
                "nchw",
                "return_prefix_tokens",
                "take",
                "num_layers",
                "norm",
                "interpolate_pos_encoding",
            ),
        )

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in the backward pass instead of keeping its activations
        (transformers' name, as in the torch twin): the blocks run as a `lax.scan` with a
        `jax.checkpoint`ed step (`ViTEncoder`), so a `jax.grad` of a training step holds one
        block's activations and each block's input rather than every block's, for about one
        more forward pass of compute. The params, the masks drawn and the gradients are the
        same; the forward compiles again."""
        self._set_module(self.module.clone(gradient_checkpointing=True))

    def gradient_checkpointing_disable(self) -> None:
        """Keep every block's activations for the backward pass again (the default)."""
        self._set_module(self.module.clone(gradient_checkpointing=False))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for `gradient_checkpointing_enable` / `gradient_checkpointing_disable`."""
        self._set_module(self.module.clone(gradient_checkpointing=enable))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.module.gradient_checkpointing

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
        if train and dropout_rng is None and self.config.draws_masks:
            raise ValueError(
                "train=True with dropout or drop_path_rate in the config needs a dropout_rng"
            )
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        return self._apply(
            {"params": self.params if params is None else params},
            pixel_values,
            rngs,
            deterministic=not train,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **kwargs,
        )

    def _forward_intermediates(
        self,
        encoder_params: Any,
        pixel_values: Any,
        indices: Indices,
        return_prefix_tokens: bool,
        norm: bool,
        stop_early: bool,
        output_fmt: str,
        intermediates_only: bool,
        interpolate_pos_encoding: bool | str,
    ) -> tuple[Array, list[Any]] | list[Any]:
        """Both wrappers' `forward_intermediates`, given the encoder's params."""
        check_output_fmt(output_fmt)
        take, last = take_indices(self.config.num_hidden_layers, indices)
        self.config.check_pixel_shape(tuple(np.shape(pixel_values)), interpolate_pos_encoding)
        final, intermediates = self._intermediates(
            encoder_params,
            pixel_values,
            nchw=output_fmt == "NCHW",
            return_prefix_tokens=return_prefix_tokens,
            take=take,
            num_layers=last + 1 if stop_early else None,
            norm=norm,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return intermediates if intermediates_only else (final, intermediates)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        """Load a canonical folder, or a Hugging Face repo id from the local cache (offline;
        `revision=` a branch, tag or commit), into this class (strict: every key must
        match); the keyword arguments are `vit_core.load`'s."""
        from vit_core.loading import load

        # the twin class `cls` is (or subclasses); FlaxViTPreTrainedModel itself: the base model
        twin = next((t for t in _LOADED_AS if issubclass(cls, t)), FlaxViTModel)
        return load(
            pretrained_model_name_or_path,
            backend="flax",
            model_type=_LOADED_AS[twin],
            model_class=cls if issubclass(cls, twin) else twin,
            **kwargs,
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
        use_mask_token: bool = False,
        seed: int = 0,
        dtype: Any = jnp.float32,
        _do_init: bool = True,
    ) -> None:
        self.kind = ModelKind(classifier=False, pooler=add_pooling_layer, mask_token=use_mask_token)
        module = ViTModule(config, add_pooling_layer, dtype=dtype, use_mask_token=use_mask_token)
        super().__init__(config, module, seed, _do_init)

    def __call__(
        self,
        pixel_values: Any,
        bool_masked_pos: Any = None,
        params: Any = None,
        dropout_rng: Array | None = None,
        train: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        """`bool_masked_pos` (B, patches), true where a patch is masked: those patches'
        embeddings become the mask token (a model built with `use_mask_token`)."""
        out = self._run(
            pixel_values,
            params,
            dropout_rng,
            train,
            interpolate_pos_encoding,
            bool_masked_pos=None if bool_masked_pos is None else jnp.asarray(bool_masked_pos),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return out if return_dict else out.to_tuple()

    def forward_intermediates(
        self,
        pixel_values: Any,
        indices: Indices = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool | str = False,
        params: Any = None,
    ) -> tuple[Array, list[Any]] | list[Any]:
        """The twin's `ViTModel.forward_intermediates` (timm's contract), in jax arrays:
        the same arguments, structure and layouts (NCHW is (B, D, H/P, W/P) here too).
        Jitted: each new choice of blocks and options compiles once."""
        return self._forward_intermediates(
            self.params if params is None else params,
            pixel_values,
            indices,
            return_prefix_tokens,
            norm,
            stop_early,
            output_fmt,
            intermediates_only,
            interpolate_pos_encoding,
        )


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

    def forward_intermediates(
        self,
        pixel_values: Any,
        indices: Indices = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool | str = False,
        params: Any = None,
    ) -> tuple[Array, list[Any]] | list[Any]:
        """The encoder's (`vit` params) `FlaxViTModel.forward_intermediates`: the heads
        read none of it."""
        return self._forward_intermediates(
            (self.params if params is None else params)["vit"],
            pixel_values,
            indices,
            return_prefix_tokens,
            norm,
            stop_early,
            output_fmt,
            intermediates_only,
            interpolate_pos_encoding,
        )


class FlaxViTForMaskedImageModeling(FlaxViTPreTrainedModel):
    def __init__(
        self, config: ViTConfig, seed: int = 0, dtype: Any = jnp.float32, _do_init: bool = True
    ) -> None:
        self.kind = MIM_KIND
        super().__init__(config, ViTForMaskedImageModelingModule(config, dtype), seed, _do_init)

    def __call__(
        self,
        pixel_values: Any,
        bool_masked_pos: Any = None,
        params: Any = None,
        dropout_rng: Array | None = None,
        train: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> MaskedImageModelingOutput | tuple[Any, ...]:
        """`bool_masked_pos` (B, patches), true where a patch is masked: `loss` is then
        the L1 error of `reconstruction` over those patches (the twin's
        `ViTForMaskedImageModeling`, which no Flax library has)."""
        out = self._run(
            pixel_values,
            params,
            dropout_rng,
            train,
            interpolate_pos_encoding,
            bool_masked_pos=None if bool_masked_pos is None else jnp.asarray(bool_masked_pos),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return out if return_dict else out.to_tuple()


# The `vit_core.load` model type of each wrapper class, for `from_pretrained`.
_LOADED_AS: dict[type[FlaxViTPreTrainedModel], str] = {
    FlaxViTForImageClassification: "classification",
    FlaxViTForMaskedImageModeling: MASKED_IMAGE_MODELING,
    FlaxViTModel: "base",
}
