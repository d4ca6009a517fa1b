"""`ViTConfig`: the architecture of a ViT, as Hugging Face writes it in `config.json`.

Field names and defaults are transformers' `ViTConfig`, so a `config.json` written here
loads in transformers and one written by transformers loads here; keys this class does
not know are kept and written back, never dropped. A few fields go beyond transformers,
for checkpoints whose numerics it cannot express (timm, the original JAX release,
big_vision); they are listed in `EXTENSION_FIELDS` and default to transformers'
behaviour, so an HF folder means the same thing here as there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vit_core._io import atomic_write_text, local_path, read_json_object
from vit_core.errors import ConfigError, InputError
from vit_core.names import name_fields

CONFIG_NAME = "config.json"

# Activation names as transformers' ACT2FN spells them; each twin maps them to its
# framework's function. "gelu" is the exact (erf) form; the tanh form has three names.
ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
POOLING_TYPES = ("cls", "mean", "map")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Fields this package adds to transformers' ViTConfig. transformers keeps them as plain
# attributes but ignores them, so a config that departs from their defaults computes a
# different function there (see `transformers_compatible`).
# The family switches (docs/families.md) are extensions too.
EXTENSION_FIELDS: dict[str, Any] = {
    "use_class_token": True,
    "pooling_type": "cls",
    "classifier_uses_pooler": False,
    "num_register_tokens": 0,
    "use_distillation_token": False,
    "no_embed_class": False,
    "layerscale_value": None,
    "use_pre_norm": False,
    "patch_embedding_bias": True,
    "use_final_norm": True,
    "use_fc_norm": False,
    "use_swiglu_ffn": False,
}
# Fields transformers' ViTConfig lacks that only training reads. The inference function is
# the same at any value (like the dropout rates'), so they are no extensions and
# `transformers_compatible` ignores them; transformers keeps them as plain attributes.
TRAINING_FIELDS: dict[str, Any] = {"drop_path_rate": 0.0}
# A config asking for more classes than this is refused before the label map is built.
MAX_LABELS = 1_000_000
# What a field's JSON value must be, in words, where its type alone says it too loosely.
_EXPECTED = {
    "num_labels": "an int >= 0",
    "image_size": "a positive int or [height, width] of positive ints",
    "patch_size": "a positive int or [height, width] of positive ints",
    "id2label": 'an object of "index": "name" strings',
    "label2id": 'an object of "name": index',
    "architectures": "a list of strings",
    "num_register_tokens": "an int >= 0",
    "layerscale_value": "a finite number or null",
}
_EXPECTED_BY_TYPE: dict[Any, str] = {
    bool: "true or false",
    int: "a positive int",
    float: "a finite number",
    str: "a string",
}


def hw_pair(value: int | list[int] | tuple[int, ...], name: str) -> tuple[int, int]:
    """(height, width) of a size given as an int or a pair; a `ConfigError` naming `name`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ConfigError(
        f"ViTConfig.{name} must be an int or a pair of ints (height, width); got {value!r}"
    )


@dataclass
class ViTConfig:
    """Architecture and label set of a ViT; validated on construction.

    `image_size` and `patch_size` take an int or a (height, width) pair, as in
    transformers. The extension fields (defaults = transformers' behaviour):

    - `use_class_token`: prepend a learned class token (False for big_vision `gap` models).
    - `pooling_type`: "cls" pools the class token, "mean" averages the patch tokens
      (the prefix tokens excluded), "map" pools by attention with a learned probe.
    - `classifier_uses_pooler`: the classifier reads the pooler's output (Dense + tanh,
      the JAX `pre_logits` layer of ImageNet-21k checkpoints) instead of the pooled token.
    - the family switches of docs/families.md: `num_register_tokens`,
      `use_distillation_token`, `no_embed_class`, `layerscale_value`, `use_pre_norm`,
      `patch_embedding_bias`, `use_final_norm`, `use_fc_norm`, `use_swiglu_ffn`.

    `drop_path_rate` (a `TRAINING_FIELDS` entry, timm's and DINOv2's name): stochastic
    depth in training, at the per-block rates `drop_path_rates`; 0 turns it off.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    # Settled in __post_init__ (None: hidden_size), so typed as what the rest of the code sees.
    pooler_output_size: int = None  # type: ignore[assignment]
    pooler_act: str = "tanh"
    use_class_token: bool = True
    pooling_type: str = "cls"
    classifier_uses_pooler: bool = False
    num_register_tokens: int = 0
    use_distillation_token: bool = False
    no_embed_class: bool = False
    layerscale_value: float | None = None
    use_pre_norm: bool = False
    patch_embedding_bias: bool = True
    use_final_norm: bool = True
    use_fc_norm: bool = False
    use_swiglu_ffn: bool = False
    # The label fields settle each other in __post_init__ (transformers' defaults: 2 labels).
    num_labels: int = None  # type: ignore[assignment]
    id2label: dict[int, str] = None  # type: ignore[assignment]
    label2id: dict[str, int] = None  # type: ignore[assignment]
    problem_type: str | None = None
    architectures: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
        if self.pooler_output_size is None:
            self.pooler_output_size = self.hidden_size
        self._settle_labels()
        self.validate()

    # ----------------------------------------------------------------- labels
    def _settle_labels(self) -> None:
        """Make num_labels, id2label and label2id agree, as transformers' PretrainedConfig does."""
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ConfigError(
                    f"ViTConfig: num_labels={self.num_labels} but id2label has "
                    f"{len(self.id2label)} entries; give one of them, or make them agree"
                )
            self.num_labels = len(self.id2label)
        else:
            if self.num_labels is None:
                self.num_labels = 2  # transformers' default
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ConfigError(
                f"ViTConfig.id2label keys must be 0..{self.num_labels - 1}; "
                f"got {sorted(self.id2label)}"
            )
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
            return
        # Not required to be the exact inverse: ImageNet's label set repeats names.
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        for name, index in self.label2id.items():
            if self.id2label.get(index) != name:
                raise ConfigError(
                    f"ViTConfig.label2id[{name!r}] = {index}, but id2label[{index}] = "
                    f"{self.id2label.get(index)!r}; make the two label maps agree"
                )

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that cannot describe a ViT."""
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
            "pooler_output_size",
            "encoder_stride",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive int; got {value!r}")
        for name in ("num_labels", "num_register_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ViTConfig.{name} must be >= 0; got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"ViTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; each head needs an equal share"
            )
        image, patch = self.image_hw, self.patch_hw
        if min(image) <= 0 or min(patch) <= 0:
            raise ConfigError(
                f"ViTConfig image_size={self.image_size} and patch_size={self.patch_size} "
                "must be positive"
            )
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ConfigError(
                f"ViTConfig.image_size={image} is not a multiple of patch_size={patch}; "
                "choose an image size divisible by the patch size"
            )
        for name in ("hidden_act", "pooler_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(
                    f"ViTConfig.{name}={getattr(self, name)!r} is not supported; "
                    f"choose one of {', '.join(ACTIVATIONS)}"
                )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ViTConfig.{name} must be in [0, 1); got {getattr(self, name)}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"ViTConfig.layer_norm_eps must be > 0; got {self.layer_norm_eps}")
        if self.pooling_type not in POOLING_TYPES:
            raise ConfigError(
                f"ViTConfig.pooling_type={self.pooling_type!r}; choose one of {POOLING_TYPES}"
            )
        if not self.use_class_token and self.pooling_type == "cls":
            raise ConfigError(
                "ViTConfig: use_class_token=False needs pooling_type='mean' "
                "(there is no class token to pool)"
            )
        if self.use_distillation_token and not (
            self.use_class_token and self.pooling_type == "cls"
        ):
            raise ConfigError(
                "ViTConfig: use_distillation_token=True needs use_class_token=True and "
                "pooling_type='cls' (the two heads read the class and distillation tokens)"
            )
        if self.use_distillation_token and self.classifier_uses_pooler:
            raise ConfigError(
                "ViTConfig: use_distillation_token=True and classifier_uses_pooler=True: a "
                "distilled classifier's two heads read the class and distillation tokens "
                "themselves, so a pooler would be trained by nothing"
            )
        if self.use_fc_norm and not self.use_final_norm:
            raise ConfigError(
                "ViTConfig: use_fc_norm=True moves the final LayerNorm after pooling; it needs "
                "use_final_norm=True"
            )
        if self.classifier_uses_pooler and self.pooler_output_size != self.hidden_size:
            raise ConfigError(
                "ViTConfig: classifier_uses_pooler=True needs pooler_output_size == hidden_size"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"ViTConfig.problem_type={self.problem_type!r}; choose one of {PROBLEM_TYPES}"
            )

    # ------------------------------------------------------- derived geometry
    @property
    def image_hw(self) -> tuple[int, int]:
        return hw_pair(self.image_size, "image_size")

    @property
    def patch_hw(self) -> tuple[int, int]:
        return hw_pair(self.patch_size, "patch_size")

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Patches per column and per row at `image_size`."""
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers (in that order)."""
        return (
            int(self.use_class_token) + int(self.use_distillation_token) + self.num_register_tokens
        )

    @property
    def num_position_prefix(self) -> int:
        """Rows of the position table before the patches' (none with `no_embed_class`)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def num_positions(self) -> int:
        """Rows of the position-embedding table: one per patch, plus the prefix tokens'."""
        gh, gw = self.grid_hw
        return gh * gw + self.num_position_prefix

    @property
    def mlp_in_width(self) -> int:
        """Output width of the first MLP layer: doubled for the gated (SwiGLU) MLP."""
        return 2 * self.intermediate_size if self.use_swiglu_ffn else self.intermediate_size

    @property
    def has_token_norm(self) -> bool:
        """Whether the final LayerNorm normalises every token (`layernorm`)."""
        return self.use_final_norm and not self.use_fc_norm

    @property
    def draws_masks(self) -> bool:
        """Whether training draws random masks: dropout, attention dropout or drop path."""
        rates = (self.hidden_dropout_prob, self.attention_probs_dropout_prob, self.drop_path_rate)
        return any(rate > 0 for rate in rates)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Each block's stochastic-depth rate, timm's linear rule: 0 at the first block
        rising to `drop_path_rate` at the last, so the early blocks, whose features every
        later block builds on, are dropped least (Huang et al., 2016). timm draws the line
        with float32 `torch.linspace`; it is exact here, so the two agree to float32 rounding.
        """
        depth = self.num_hidden_layers
        if depth == 1:
            return (0.0,)  # torch.linspace(0, rate, 1) is [0]
        return tuple(self.drop_path_rate * i / (depth - 1) for i in range(depth))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_pixel_shape(
        self, shape: tuple[int, ...], interpolate_pos_encoding: bool | str
    ) -> None:
        """Fail before any compute on pixel_values the model cannot read (both twins call it)."""
        if len(shape) != 4:
            raise InputError(
                f"pixel_values must be (batch, channels, height, width); got shape {shape}"
            )
        _, channels, height, width = shape
        if channels != self.num_channels:
            raise InputError(
                f"pixel_values have {channels} channels; the model expects {self.num_channels}"
            )
        (ph, pw), (h0, w0) = self.patch_hw, self.image_hw
        if height % ph or width % pw:
            raise InputError(
                f"input size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                "resize the image (the patch size of a trained model cannot change)"
            )
        if not interpolate_pos_encoding and (height, width) != (h0, w0):
            raise InputError(
                f"input size {height}x{width} does not match the model's {h0}x{w0}; resize the "
                "image, or pass interpolate_pos_encoding=True to resample the position embeddings"
            )

    @property
    def transformers_compatible(self) -> bool:
        """Whether transformers computes the same function from this config."""
        return all(getattr(self, k) == v for k, v in EXTENSION_FIELDS.items())

    def resolved_problem_type(self, labels_are_integers: bool) -> str:
        """The loss transformers would pick for these labels (see its `ForImageClassification`)."""
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels_are_integers:
            return "single_label_classification"
        return "multi_label_classification"

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content; unknown keys read earlier are written back."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "num_labels"):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            if f.name == "id2label":
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        out["model_type"] = "vit"
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        data = {**data, **overrides}
        model_type = data.get("model_type", "vit")
        if model_type != "vit":
            raise ConfigError(
                f"config has model_type={model_type!r}; this package reads plain ViT ('vit') "
                "configs only"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "model_type"}
        extra.update(data.get("extra", {}))
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ViTConfig:
        """The one reader of `config.json` (`vit_core.load` and `from_pretrained` both use
        it): every problem is a `ConfigError` naming the file and the field."""
        data = read_json_object(Path(path))
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            raise ConfigError(
                f"{path}: a field has a value of the wrong kind ({type(exc).__name__}: "
                f"{exc}); compare it with a config.json written by save_pretrained"
            ) from None

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ViTConfig:
        """Read `config.json` from a local folder (or the file itself)."""
        path = local_path(path)
        config = cls.from_json_file(path / CONFIG_NAME if path.is_dir() else path)
        return dataclasses.replace(config, **overrides) if overrides else config

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(folder / CONFIG_NAME, self.to_json_string())

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ViTConfig:
        """A standard architecture by name, in any ecosystem's spelling (see `vit_core.names`):
        "vit-base-patch16-224", "vit_large_patch32_384.augreg_in21k", "ViT-B_16", "B/16".
        Sizes tiny/small/base/large/huge, patches 8/14/16/32, any resolution the patch divides.
        """
        return cls(**{**name_fields(name), **overrides})


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON (or Python) value is of the annotated type; JSON object keys are
    strings, so an int key may come as its digits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(arg, value) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _accepts(int, value) or (isinstance(value, float) and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return (
            isinstance(value, list | tuple)
            and len(value) == len(args)
            and all(map(_accepts, args, value))
        )
    if origin is list:
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value)
    if origin is dict:
        key_hint, value_hint = args
        return isinstance(value, dict) and all(
            (_accepts(key_hint, k) or (key_hint is int and str(k).lstrip("-").isdigit()))
            and _accepts(value_hint, v)
            for k, v in value.items()
        )
    raise TypeError(f"no JSON reading for the annotation {hint!r}")  # a new field's type


def check_field_types(config: ViTConfig) -> None:
    """Refuse field values of the wrong type, driven by the dataclass annotations.

    Runs first on every construction (`from_dict`, `from_pretrained`, `vit_core.load`,
    `ViTConfig(...)`), so a string where a bool belongs (`"qkv_bias": "false"`, which
    Python would take as true) or a huge label count fails with the field's name.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "extra" or (value is None and f.default is None):
            continue
        hint = _FIELD_TYPES[f.name]
        sizes = [value] if isinstance(value, int) else value  # sizes are positive ints
        if not _accepts(hint, value) or (f.name in _SIZE_FIELDS and not all(v > 0 for v in sizes)):
            expected = _EXPECTED.get(f.name) or _EXPECTED_BY_TYPE[hint]
            raise ConfigError(f"ViTConfig.{f.name} must be {expected}; got {value!r}")
    labels = config.num_labels
    if labels is not None and not 0 <= labels <= MAX_LABELS:
        expected = _EXPECTED["num_labels"] if labels < 0 else f"at most {MAX_LABELS:,}"
        raise ConfigError(f"ViTConfig.num_labels must be {expected}; got {labels}")


_FIELD_TYPES = typing.get_type_hints(ViTConfig)
# Fields that count or measure something: ints (or pairs of ints) that must be positive.
_SIZE_FIELDS = frozenset(
    name
    for name, hint in _FIELD_TYPES.items()
    if name not in ("num_labels", "num_register_tokens") and hint in (int, int | tuple[int, int])
)
