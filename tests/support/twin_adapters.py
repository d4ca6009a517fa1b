"""One adapter per twin, so that a test written once runs on both (tests/twins/).

Each adapter hides its framework behind the same calls: build a model from a config, run
it on numpy pixels to numpy outputs (in inference or in training mode, with a numbered
dropout draw), take gradients, train a step, read its weights as named numpy arrays, and
say what transformers offers as its own framework's reference. What differs between the
twins' APIs lives here, once; what a test asserts lives in the test.

Dropout draws: torch draws masks from its global generator, seeded with the draw number;
Flax gets `jax.random.PRNGKey(draw)` as its `dropout_rng`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn
from flax import traverse_util

import vit_flax
import vit_torch
from vit_core import ViTConfig
from vit_core.outputs import ModelOutput
from vit_flax.modeling import ViTDropPath as FlaxViTDropPath
from vit_flax.modeling import ViTEmbeddings as FlaxViTEmbeddings
from vit_flax.modeling import ViTLayer as FlaxViTLayer


def to_numpy(value: Any) -> Any:
    """An output record, tuple or tensor with every tensor as a numpy array."""
    if isinstance(value, ModelOutput):
        fields = dataclasses.fields(value)
        return dataclasses.replace(
            value, **{f.name: to_numpy(getattr(value, f.name)) for f in fields}
        )
    if isinstance(value, tuple):
        return tuple(to_numpy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return None if value is None else np.asarray(value)


def run_transformers(model: Any, pixels: np.ndarray, labels: Any = None, **flags: Any) -> Any:
    """A transformers PyTorch model on numpy pixels (and labels)."""
    if labels is not None:
        flags["labels"] = torch.from_numpy(labels)
    with torch.no_grad():
        return model(torch.from_numpy(pixels), **flags)


@dataclass(frozen=True)
class BlockTrace:
    """One block's training-mode forward: its input and output tokens (B, T, D), and for
    each residual branch (attention, then MLP) its drop path's rate, input and output."""

    input: np.ndarray
    output: np.ndarray
    branches: tuple[tuple[float, np.ndarray, np.ndarray], ...]


def block_traces(
    layers: list[tuple[np.ndarray, np.ndarray]], drops: list[tuple[float, np.ndarray, np.ndarray]]
) -> list[BlockTrace]:
    """What a forward recorded, in call order (two drop paths per block), as one trace each."""
    assert len(drops) == 2 * len(layers), (len(layers), len(drops))
    return [BlockTrace(x, y, tuple(drops[2 * i : 2 * i + 2])) for i, (x, y) in enumerate(layers)]


def heads(classification: type, encoder: type) -> dict[str, type]:
    """head -> model class, with the oracle's head names (tests/conftest.py)."""
    return {"classification": classification, "pooler": encoder, "base": encoder}


class Twin(Protocol):
    """What each adapter offers (`TorchTwin`, `FlaxTwin`)."""

    name: ClassVar[str]
    classes: ClassVar[dict[str, type]]  # head -> model class; "base": the encoder's
    # A second model holding the same weights runs without compiling anything (a Flax
    # model compiles its forward on its first call).
    reruns_cheaply: ClassVar[bool]
    # transformers also has a ViT in this twin's framework besides its PyTorch one (which
    # every twin is compared with): Flax's `FlaxViTModel` & co, square images only.
    transformers_flax: ClassVar[bool]

    def build(self, config: ViTConfig, head: str = "classification", seed: int = 0) -> Any:
        """A fresh model; head: "classification", "pooler" or "base" (no pooler)."""
        ...

    def with_config(self, model: Any, config: ViTConfig) -> Any:
        """A model of the same class holding `model`'s weights under another config."""
        ...

    def run(
        self, model: Any, pixels: np.ndarray, train: bool = False, draw: int = 0, **kwargs: Any
    ) -> Any:
        """The output record (a tuple with `return_dict=False`) in numpy; `labels` (numpy)
        and the output flags are passed on."""
        ...

    def embeddings(self, model: Any, pixels: np.ndarray, train: bool, draw: int = 0) -> Any:
        """The tokens (B, T, D) of a classification model's embeddings block."""
        ...

    def gradients(
        self, model: Any, pixels: np.ndarray, labels: np.ndarray, train: bool, draw: int = 0
    ) -> tuple[float, dict[str, np.ndarray | None]]:
        """(loss, gradient per weight name; None where the loss never reached it)."""
        ...

    def trainer(
        self, model: Any, lr: float, weight_decay: float
    ) -> Callable[[np.ndarray, np.ndarray, int], float]:
        """`step(pixels, labels, draw) -> loss`: one AdamW step in training mode, in place."""
        ...

    def drop_path_traces(self, model: Any, pixels: np.ndarray, draw: int = 0) -> list[BlockTrace]:
        """Every block of a forward in training mode, in order (`BlockTrace`)."""
        ...

    def weights(self, model: Any) -> dict[str, np.ndarray]: ...

    def encoder_weights(self, model: Any) -> dict[str, np.ndarray]:
        """A classification model's encoder (`vit`) weights."""
        ...

    def has_pooler(self, model: Any) -> bool: ...

    def perturb(self, oracle: Any, model: Any, seed: int) -> Any:
        """The oracle's perturbation of every weight (tests/conftest.py)."""
        ...


class TorchTwin:
    name = "torch"
    classes = heads(vit_torch.ViTForImageClassification, vit_torch.ViTModel)
    reruns_cheaply = True
    transformers_flax = False

    def build(self, config: ViTConfig, head: str = "classification", seed: int = 0) -> Any:
        torch.manual_seed(seed)
        if head == "classification":
            return vit_torch.ViTForImageClassification(config)
        return vit_torch.ViTModel(config, add_pooling_layer=head == "pooler")

    def with_config(self, model: Any, config: ViTConfig) -> Any:
        other = type(model)(config)
        other.load_state_dict(model.state_dict())
        return other

    def run(
        self, model: Any, pixels: np.ndarray, train: bool = False, draw: int = 0, **kwargs: Any
    ) -> Any:
        if kwargs.get("labels") is not None:
            kwargs["labels"] = torch.from_numpy(kwargs["labels"])
        model.train(train)
        torch.manual_seed(draw)
        with torch.no_grad():
            return to_numpy(model(torch.from_numpy(pixels), **kwargs))

    def embeddings(self, model: Any, pixels: np.ndarray, train: bool, draw: int = 0) -> Any:
        block = model.vit.embeddings.train(train)
        torch.manual_seed(draw)
        with torch.no_grad():
            return block(torch.from_numpy(pixels), None, False).numpy()

    def gradients(
        self, model: Any, pixels: np.ndarray, labels: np.ndarray, train: bool, draw: int = 0
    ) -> tuple[float, dict[str, np.ndarray | None]]:
        model.train(train).zero_grad(set_to_none=True)
        torch.manual_seed(draw)
        loss = model(torch.from_numpy(pixels), labels=torch.from_numpy(labels)).loss
        loss.backward()
        grads = {n: None if p.grad is None else p.grad.numpy() for n, p in model.named_parameters()}
        return loss.item(), grads

    def trainer(
        self, model: Any, lr: float, weight_decay: float
    ) -> Callable[[np.ndarray, np.ndarray, int], float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

        def step(pixels: np.ndarray, labels: np.ndarray, draw: int) -> float:
            model.train()
            torch.manual_seed(draw)
            loss = model(torch.from_numpy(pixels), labels=torch.from_numpy(labels)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        return step

    def drop_path_traces(self, model: Any, pixels: np.ndarray, draw: int = 0) -> list[BlockTrace]:
        layers: list[tuple[np.ndarray, np.ndarray]] = []
        drops: list[tuple[float, np.ndarray, np.ndarray]] = []

        def on_layer(module: Any, args: tuple[Any, ...], out: Any) -> None:
            layers.append((args[0].numpy(), out[0].numpy()))

        def on_drop(module: Any, args: tuple[Any, ...], out: Any) -> None:
            drops.append((module.rate, args[0].numpy(), out.numpy()))

        hooks = [
            m.register_forward_hook(
                on_layer if isinstance(m, vit_torch.modeling.ViTLayer) else on_drop
            )
            for m in model.modules()
            if isinstance(m, vit_torch.modeling.ViTLayer | vit_torch.modeling.ViTDropPath)
        ]
        try:
            self.run(model, pixels, train=True, draw=draw)
        finally:
            for hook in hooks:
                hook.remove()
        return block_traces(layers, drops)

    def weights(self, model: Any) -> dict[str, np.ndarray]:
        return {name: t.detach().numpy() for name, t in model.state_dict().items()}

    def encoder_weights(self, model: Any) -> dict[str, np.ndarray]:
        return self.weights(model.vit)

    def has_pooler(self, model: Any) -> bool:
        return getattr(model, "vit", model).pooler is not None

    def perturb(self, oracle: Any, model: Any, seed: int) -> Any:
        return oracle.perturb_torch(model, seed)


def _flat(params: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


class FlaxTwin:
    name = "flax"
    classes = heads(vit_flax.FlaxViTForImageClassification, vit_flax.FlaxViTModel)
    reruns_cheaply = False
    transformers_flax = True

    def build(self, config: ViTConfig, head: str = "classification", seed: int = 0) -> Any:
        if head == "classification":
            return vit_flax.FlaxViTForImageClassification(config, seed=seed)
        return vit_flax.FlaxViTModel(config, add_pooling_layer=head == "pooler", seed=seed)

    def with_config(self, model: Any, config: ViTConfig) -> Any:
        other = type(model)(config, _do_init=False)
        other.params = model.params
        return other

    def run(
        self, model: Any, pixels: np.ndarray, train: bool = False, draw: int = 0, **kwargs: Any
    ) -> Any:
        rng = jax.random.PRNGKey(draw) if train else None
        return to_numpy(model(pixels, train=train, dropout_rng=rng, **kwargs))

    def embeddings(self, model: Any, pixels: np.ndarray, train: bool, draw: int = 0) -> Any:
        variables = {"params": model.params["vit"]["embeddings"]}
        nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
        rngs = {"dropout": jax.random.PRNGKey(draw)} if train else {}
        block = FlaxViTEmbeddings(model.config)
        return np.asarray(block.apply(variables, nhwc, None, False, not train, rngs=rngs))

    def gradients(
        self, model: Any, pixels: np.ndarray, labels: np.ndarray, train: bool, draw: int = 0
    ) -> tuple[float, dict[str, np.ndarray | None]]:
        rng = jax.random.PRNGKey(draw) if train else None

        def loss_fn(params: Any) -> jax.Array:
            return model(pixels, labels=labels, params=params, train=train, dropout_rng=rng).loss

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model.params)
        return float(loss), _flat(grads)

    def trainer(
        self, model: Any, lr: float, weight_decay: float
    ) -> Callable[[np.ndarray, np.ndarray, int], float]:
        optimizer = optax.adamw(lr, weight_decay=weight_decay)

        @jax.jit
        def update(params: Any, opt_state: Any, pixels: Any, labels: Any, rng: Any) -> tuple:
            def loss_fn(p: Any) -> jax.Array:
                return model(pixels, labels=labels, params=p, dropout_rng=rng, train=True).loss

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        state = {"opt": optimizer.init(model.params)}

        def step(pixels: np.ndarray, labels: np.ndarray, draw: int) -> float:
            model.params, state["opt"], loss = update(
                model.params, state["opt"], pixels, labels, jax.random.PRNGKey(draw)
            )
            return float(loss)

        return step

    def drop_path_traces(self, model: Any, pixels: np.ndarray, draw: int = 0) -> list[BlockTrace]:
        layers: list[tuple[np.ndarray, np.ndarray]] = []
        drops: list[tuple[float, np.ndarray, np.ndarray]] = []

        def record(call: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
            out = call(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, FlaxViTLayer):
                layers.append((np.asarray(args[0]), np.asarray(out[0])))
            elif context.method_name == "__call__" and isinstance(context.module, FlaxViTDropPath):
                drops.append((context.module.rate, np.asarray(args[0]), np.asarray(out)))
            return out

        nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
        with nn.intercept_methods(record):  # not jitted: every array is concrete
            model.module.apply(
                {"params": model.params},
                nhwc,
                deterministic=False,
                rngs={"dropout": jax.random.PRNGKey(draw)},
            )
        return block_traces(layers, drops)

    def weights(self, model: Any) -> dict[str, np.ndarray]:
        return _flat(model.params)

    def encoder_weights(self, model: Any) -> dict[str, np.ndarray]:
        return _flat(model.params["vit"])

    def has_pooler(self, model: Any) -> bool:
        return "pooler" in model.params.get("vit", model.params)

    def perturb(self, oracle: Any, model: Any, seed: int) -> Any:
        model.params = oracle.perturb_flax(model.params, seed)
        return model


TWINS: dict[str, Callable[[], Twin]] = {"torch": TorchTwin, "flax": FlaxTwin}
