"""The twins' modeling files mirror each other, checked mechanically from their source text.

`vit_torch/modeling.py` and `vit_flax/modeling.py` must define the same blocks (public
classes and module-level functions) in the same order, each with the same constructor and
call parameters: names, order, kind and default values (not annotations: the tensor types
differ). The differences each framework imposes are written once, in the table below;
anything else that differs fails, naming the block and the parameter. The files are read
with `ast`: neither framework is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"torch": ROOT / "vit_torch" / "modeling.py", "flax": ROOT / "vit_flax" / "modeling.py"}

# ---------------------------------------------------------------------------- the table
# Every framework-inherent difference, once. Names with a leading underscore (torch's
# `_QuickGELU`, Flax's `_dense`, `_layer_norm`, `_quick_gelu`) are each framework's own
# helpers and are not compared.

# The method a block is called through.
CALL = {"torch": "forward", "flax": "__call__"}

# A torch model is both the architecture and the object users call; Flax splits it into a
# linen module (the architecture; params outside) and a wrapper holding the params and a
# jitted forward, as transformers' Flax models do. torch class -> (linen module, wrapper).
# The linen modules stand where the torch classes stand; the wrappers stand together, in
# the same order, after them.
SPLIT: dict[str, tuple[str | None, str]] = {
    "ViTPreTrainedModel": (None, "FlaxViTPreTrainedModel"),
    "ViTModel": ("ViTModule", "FlaxViTModel"),
    "ViTForImageClassification": (
        "ViTForImageClassificationModule",
        "FlaxViTForImageClassification",
    ),
    "ViTForMaskedImageModeling": (
        "ViTForMaskedImageModelingModule",
        "FlaxViTForMaskedImageModeling",
    ),
}
WRAPPERS = {wrapper for _, wrapper in SPLIT.values()}

# A torch `__init__(self, ...)` is compared with a plain class's `__init__`, or with a
# linen module's dataclass fields (`config: ViTConfig`, ...), in order.

# Same parameter, another name.
RENAMED = {"pixels_nhwc": "pixel_values"}  # linen modules take NHWC; the wrapper transposes

# Parameters Flax may have where torch has none, and what stands for each in torch.
FLAX_ONLY = {
    "dtype": "Flax modules and models compute in a `dtype`; torch casts with `.to(dtype)`",
    "deterministic": "torch reads `self.training` (`.train()` / `.eval()`)",
    "module": "a Flax wrapper is handed its linen module; a torch model is its own module",
    "params": "Flax params live outside the module; torch's are its attributes",
    "dropout_rng": "torch draws dropout masks from its global generator",
    "rng": (
        "a block's masks come from the key the Flax encoder hands it (the same one scanned "
        "or unrolled); torch's blocks draw from its global generator"
    ),
    "train": "torch's `.train()` / `.eval()`",
    "_do_init": "transformers' Flax convention: a wrapper built without params",
    "gradient_checkpointing": (
        "linen modules are frozen, so the Flax wrapper's `gradient_checkpointing_enable` "
        "rebuilds its module with this field (transformers' Flax models do the same); the "
        "torch twin's sets the attribute `ViTEncoder.gradient_checkpointing` in place"
    ),
}

# Parameters of a torch model that its linen module may lack, because the wrapper holds them.
WRAPPER_ONLY = {
    "seed": "a linen module gets its params from `init`; the wrapper draws them from `seed`",
    "return_dict": "a linen module returns records; the wrapper turns them into tuples",
}

# Defaults that differ by framework: parameter -> (torch's, Flax's).
DEFAULTS = {
    # torch's None: torch's global generator decides (`torch.manual_seed`); jax has none
    "seed": ("None", "0"),
}

# Parameters torch may have where Flax has none, by block.
TORCH_ONLY = {
    ("ViTAttention", "output_attentions"): (
        "torch picks the fused SDPA kernel, which cannot return the probabilities, unless "
        "asked for them; Flax always computes them and jit drops them when unused"
    ),
    ("ViTLayer", "output_attentions"): "handed on to ViTAttention (above)",
}

# Parameters a Flax block may have where its torch twin has none, by block.
FLAX_BLOCK_ONLY = {
    ("FlaxViTPreTrainedModel", "seed"): (
        "the Flax base class draws the params of the linen module it is handed, so it takes "
        "the seed; a torch model draws after building its submodules, so each torch model "
        "(ViTModel, ViTForImageClassification) takes it instead, as its wrapper twin does"
    ),
}


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "positional", "*args", "keyword-only", "**kwargs"
    default: str | None  # the default's source text; None when required


@dataclass(frozen=True)
class Block:
    name: str
    kind: str  # "class" or "function"
    constructor: tuple[Param, ...] | None  # classes only
    call: tuple[Param, ...] | None  # a class's call method, or a function's own parameters


def _params(args: ast.arguments, skip_self: bool) -> tuple[Param, ...]:
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [
        Param(a.arg, "positional", None if d is None else ast.unparse(d))
        for a, d in zip(positional, defaults, strict=True)
    ][1 if skip_self else 0 :]
    if args.vararg:
        params.append(Param(args.vararg.arg, "*args", None))
    params += [
        Param(a.arg, "keyword-only", None if d is None else ast.unparse(d))
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg:
        params.append(Param(args.kwarg.arg, "**kwargs", None))
    return tuple(params)


def _fields(node: ast.ClassDef) -> tuple[Param, ...]:
    """A dataclass's fields (a linen module's), in order."""
    return tuple(
        Param(s.target.id, "positional", None if s.value is None else ast.unparse(s.value))
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    )


def read_blocks(source: str, framework: str) -> list[Block]:
    """The public top-level classes and functions of a modeling file, in order."""
    blocks = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            blocks.append(Block(node.name, "function", None, _params(node.args, False)))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            methods = {s.name: s for s in node.body if isinstance(s, ast.FunctionDef)}
            init = methods.get("__init__")
            call = methods.get(CALL[framework])
            blocks.append(
                Block(
                    node.name,
                    "class",
                    _fields(node) if init is None else _params(init.args, True),
                    None if call is None else _params(call.args, True),
                )
            )
    return blocks


# ---------------------------------------------------------------------------- comparing
def _drop(params: tuple[Param, ...], allowed: set[str], other: tuple[Param, ...]) -> list[Param]:
    """`params` less those of `allowed` that the other twin lacks (a mapped difference is
    allowed, never required: where both have one, it is compared like any other)."""
    theirs = {p.name for p in other}
    return [p for p in params if p.name not in allowed or p.name in theirs]


def compare_names(
    where: str, noun: str, torch_names: list[str], flax_names: list[str]
) -> list[str]:
    """Names one twin lacks, then the first pair of common names out of order."""
    problems = [
        f"{where}: {noun} {name!r} only in {side}"
        for side, mine, theirs in (
            ("torch", torch_names, flax_names),
            ("flax", flax_names, torch_names),
        )
        for name in mine
        if name not in theirs
    ]
    common_t = [n for n in torch_names if n in flax_names]
    common_f = [n for n in flax_names if n in torch_names]
    if common_t != common_f:
        t, f = next((t, f) for t, f in zip(common_t, common_f, strict=True) if t != f)
        problems.append(f"{where}: {noun}s in another order, first at {t!r} (torch) / {f!r} (flax)")
    return problems


def compare_params(
    where: str,
    what: str,
    torch_params: tuple[Param, ...] | None,
    flax_params: tuple[Param, ...] | None,
    torch_allowed: set[str],
    flax_allowed: frozenset[str] = frozenset(),
) -> list[str]:
    if torch_params is None or flax_params is None:
        if (torch_params is None) != (flax_params is None):
            side, method = (
                ("torch", CALL["torch"]) if flax_params is None else ("flax", CALL["flax"])
            )
            return [f"{where}: only {side} defines a {what} (`{method}`)"]
        return []
    noun = f"{what} parameter" if what else "parameter"
    flax_params = tuple(Param(RENAMED.get(p.name, p.name), p.kind, p.default) for p in flax_params)
    torch_kept = _drop(torch_params, torch_allowed, flax_params)
    flax_kept = _drop(flax_params, set(FLAX_ONLY) | flax_allowed, torch_params)
    torch_names, flax_names = [p.name for p in torch_kept], [p.name for p in flax_kept]
    problems = compare_names(where, noun, torch_names, flax_names)
    by_name = {p.name: p for p in flax_kept}
    for t in torch_kept:
        f = by_name.get(t.name)
        if f is None or (t.kind, t.default) == (f.kind, f.default):
            continue
        if t.kind == f.kind and DEFAULTS.get(t.name) == (t.default, f.default):
            continue
        problems.append(
            f"{where}: {noun} {t.name!r} is {t.kind}, default {t.default} in "
            f"torch but {f.kind}, default {f.default} in flax"
        )
    return problems


def compare_blocks(torch_block: Block, flax_block: Block, linen_of_split: bool) -> list[str]:
    """One pair of twin blocks. `linen_of_split`: a torch model against its linen module."""
    same = torch_block.name == flax_block.name
    where = torch_block.name if same else f"{torch_block.name} / {flax_block.name}"
    if torch_block.kind != flax_block.kind:
        return [f"{where}: a {torch_block.kind} in torch but a {flax_block.kind} in flax"]
    allowed = set(WRAPPER_ONLY) if linen_of_split else set()
    call_allowed = allowed | {p for b, p in TORCH_ONLY if b == torch_block.name}
    if torch_block.kind == "function":
        return compare_params(where, "", torch_block.call, flax_block.call, call_allowed)
    flax_allowed = frozenset(p for b, p in FLAX_BLOCK_ONLY if b == flax_block.name)
    return [
        *compare_params(
            where,
            "constructor",
            torch_block.constructor,
            flax_block.constructor,
            allowed,
            flax_allowed,
        ),
        *compare_params(where, "call", torch_block.call, flax_block.call, call_allowed),
    ]


def mirror_problems(torch_source: str, flax_source: str) -> list[str]:
    """Every difference between the twins' modeling files that the table does not map."""
    torch_blocks = {b.name: b for b in read_blocks(torch_source, "torch")}
    flax_blocks = {b.name: b for b in read_blocks(flax_source, "flax")}
    # torch name -> (flax name, linen module of a split model?) for the architecture layer
    architecture = {
        name: (SPLIT[name][0], True) if name in SPLIT else (name, False)
        for name in torch_blocks
        if name not in SPLIT or SPLIT[name][0] is not None
    }
    flax_architecture = [n for n in flax_blocks if n not in WRAPPERS]
    problems = compare_names(
        "modules and functions", "block", [f for f, _ in architecture.values()], flax_architecture
    )
    wrappers = [SPLIT[n][1] for n in torch_blocks if n in SPLIT]
    problems += compare_names(
        "Flax wrappers", "block", wrappers, [n for n in flax_blocks if n in WRAPPERS]
    )
    pairs = [(t, f, linen) for t, (f, linen) in architecture.items()]
    pairs += [(t, SPLIT[t][1], False) for t in torch_blocks if t in SPLIT]
    for torch_name, flax_name, linen in pairs:
        if flax_name in flax_blocks:
            problems += compare_blocks(torch_blocks[torch_name], flax_blocks[flax_name], linen)
    return problems


def _real_problems() -> list[str]:
    return mirror_problems(*(SOURCES[f].read_text() for f in ("torch", "flax")))


# ------------------------------------------------------------------------------- tests
def test_the_twins_mirror_each_other() -> None:
    problems = _real_problems()
    assert not problems, "the twins' modeling files differ:\n" + "\n".join(problems)


def test_the_table_maps_only_what_the_files_hold() -> None:
    """No stale row: every block the table names is defined in its twin's file."""
    names = {f: {b.name for b in read_blocks(SOURCES[f].read_text(), f)} for f in SOURCES}
    named = {("torch", t) for t in SPLIT} | {("flax", n) for pair in SPLIT.values() for n in pair}
    named |= {("torch", block) for block, _ in TORCH_ONLY}
    named |= {("flax", block) for block, _ in FLAX_BLOCK_ONLY}
    assert not {(f, n) for f, n in named if n is not None and n not in names[f]}


# ----------------------------------------------------------- self-test on broken copies
def _find(tree: ast.Module, block: str, method: str | None = None) -> ast.AST:
    node = next(n for n in tree.body if getattr(n, "name", None) == block)
    if method is None:
        return node
    return next(n for n in node.body if getattr(n, "name", None) == method)


def _add_param(block: str, method: str | None, name: str, default: str = "None"):
    def edit(tree: ast.Module) -> None:
        fn = _find(tree, block, method)
        fn.args.args.append(ast.arg(name))
        fn.args.defaults.append(ast.parse(default, mode="eval").body)

    return edit


def _add_field(block: str, field: str):
    def edit(tree: ast.Module) -> None:
        _find(tree, block).body.insert(1, ast.parse(field).body[0])

    return edit


def _append(source: str):
    def edit(tree: ast.Module) -> None:
        tree.body.append(ast.parse(source).body[0])

    return edit


def _swap(first: str, second: str):
    def edit(tree: ast.Module) -> None:
        i, j = (tree.body.index(_find(tree, name)) for name in (first, second))
        tree.body[i], tree.body[j] = tree.body[j], tree.body[i]

    return edit


def _rename_param(block: str, method: str, old: str, new: str):
    def edit(tree: ast.Module) -> None:
        next(a for a in _find(tree, block, method).args.args if a.arg == old).arg = new

    return edit


def _set_default(block: str, method: str, param: str, value: str):
    def edit(tree: ast.Module) -> None:
        args = _find(tree, block, method).args
        names = [a.arg for a in args.args]
        index = names.index(param) - (len(names) - len(args.defaults))
        args.defaults[index] = ast.parse(value, mode="eval").body

    return edit


# name -> (twin broken, edit, words the new problem must name)
BREAKS = {
    "block-in-torch-only": (
        "torch",
        _append("class ViTExtra(nn.Module):\n    def forward(self, x):\n        return x"),
        ("ViTExtra", "only in torch"),
    ),
    "wrapper-in-flax-only": (
        "flax",
        _append("class FlaxViTExtra(FlaxViTPreTrainedModel):\n    pass"),
        ("FlaxViTExtra", "only in flax"),
    ),
    "linen-field-in-flax-only": (
        "flax",
        _add_field("ViTMlp", "use_bias: bool = True"),
        ("ViTMlp", "constructor", "'use_bias'", "only in flax"),
    ),
    "call-parameter-in-torch-only": (
        "torch",
        _add_param("ViTEncoder", "forward", "scale", "1.0"),
        ("ViTEncoder", "call", "'scale'", "only in torch"),
    ),
    "model-call-parameter-in-flax-only": (
        "flax",
        _add_param("FlaxViTModel", "__call__", "output_logits", "False"),
        ("ViTModel / FlaxViTModel", "call", "'output_logits'"),
    ),
    "model-constructor-parameter-in-torch-only": (
        "torch",
        _add_param("ViTForImageClassification", "__init__", "head_bias", "True"),
        ("ViTForImageClassification / ViTForImageClassificationModule", "'head_bias'"),
    ),
    "function-parameter-in-flax-only": (
        "flax",
        _add_param("pool", None, "keepdims", "False"),
        ("pool", "'keepdims'", "only in flax"),
    ),
    "renamed-parameter": (
        "torch",
        _rename_param("ViTPooler", "forward", "pooled", "tokens"),
        ("ViTPooler", "'tokens'", "only in torch"),
    ),
    "other-default": (
        "torch",
        _set_default("ViTModel", "__init__", "add_pooling_layer", "False"),
        ("ViTModel", "'add_pooling_layer'", "default False in torch"),
    ),
    "mapped-default-changed": (
        "flax",
        _set_default("FlaxViTModel", "__init__", "seed", "1"),
        ("ViTModel / FlaxViTModel", "'seed'", "default 1 in flax"),
    ),
    "blocks-swapped": (
        "flax",
        _swap("ViTAttention", "ViTMlp"),
        ("another order", "ViTAttention", "ViTMlp"),
    ),
}


@pytest.mark.parametrize("name", BREAKS)
def test_a_difference_is_named(name: str) -> None:
    """A broken copy of one twin's source fails with the block and parameter named."""
    twin, edit, words = BREAKS[name]
    sources = {f: path.read_text() for f, path in SOURCES.items()}
    tree = ast.parse(sources[twin])
    edit(tree)
    broken = {**sources, twin: ast.unparse(tree)}
    new = set(mirror_problems(broken["torch"], broken["flax"])) - set(_real_problems())
    assert any(all(w in p for w in words) for p in new), (words, sorted(new))
