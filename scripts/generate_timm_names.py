"""Write `vit_core/timm_names.json`: every timm ViT/DeiT name as `ViTConfig` fields.

    python scripts/generate_timm_names.py           # rewrite the table from installed timm
    python scripts/generate_timm_names.py --check   # exit 1 if the file differs

timm is not a dependency of `vit_core`, and names resolve offline, so the table is read
from timm once, here: every architecture registered in `timm.models.vision_transformer`
and `timm.models.deit`, and every pretrained tag of theirs, is built on the meta device
(`timm.create_model(name, pretrained=False)`: the real depth and width, no memory, no
download) and its modules are read back. An architecture this package cannot run (an
RMSNorm, post-norm or parallel blocks, extra norms inside the blocks, ...) is written
with the reason, which `vit_core.names.name_fields` raises as a `ConfigError`.

A row keeps only the fields that differ from `vit_core.names.TIMM_BASE` (timm's
defaults); a tag keeps only what differs from its architecture (usually nothing, or its
head size). tests/vit_core/test_names.py rebuilds a sample of rows in memory and checks
that they equal the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from vit_core.names import TIMM_BASE, TIMM_NAMES_FILE  # noqa: E402

MODULES = ("vision_transformer", "deit")
OUT = ROOT / "vit_core" / TIMM_NAMES_FILE
MODEL_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")
# timm activation modules -> transformers' ACT2FN names
ACTIVATIONS = {
    "GELU": "gelu",
    "GELUTanh": "gelu_pytorch_tanh",
    "QuickGELU": "quick_gelu",
    "SiLU": "silu",
    "ReLU": "relu",
    "Tanh": "tanh",
}
POOLING = {"token": "cls", "avg": "mean", "map": "map"}
BLOCKS = {
    "ResPostBlock": "post-norm residual blocks (ResPostBlock: the norm after each branch)",
    "ParallelScalingBlock": "parallel attention and MLP branches (ParallelScalingBlock)",
    "ParallelThingsBlock": "parallel attention and MLP branches (ParallelThingsBlock)",
    "DiffParallelScalingBlock": "differential attention in parallel blocks "
    "(DiffParallelScalingBlock)",
}
ATTENTIONS = {"DiffAttention": "differential attention (DiffAttention)"}
# Families whose refusals read better with their published name.
FAMILY_NAMES = (("aimv2_", "AIMv2"), ("beit3_", "BEiT-3"), ("eva_", "EVA"))


def timm_names() -> tuple[list[str], list[str]]:
    """(architectures, pretrained tags) of the two modules, sorted."""
    import timm

    archs = sorted({n for m in MODULES for n in timm.list_models(module=m)})
    tags = sorted({n for m in MODULES for n in timm.list_models(module=m, pretrained=True)})
    return archs, tags


def build(name: str) -> Any:
    """The model as timm builds it for `name`, on the meta device (no weights, no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _kind(module: Any) -> str:
    return type(module).__name__


def _identity(module: Any) -> bool:
    return module is None or _kind(module) == "Identity"


def _activation(module: Any) -> str | None:
    kind = _kind(module)
    if kind == "GELU" and getattr(module, "approximate", "none") == "tanh":
        return "gelu_pytorch_tanh"
    return ACTIVATIONS.get(kind)


def _norm_problem(norm: Any, where: str) -> str | None:
    kind = _kind(norm)
    if kind == "RmsNorm" or "Rms" in kind:
        return "RMSNorm"
    if kind not in ("LayerNorm",) or not getattr(norm, "elementwise_affine", False):
        return f"a {kind} {where} (LayerNorm expected)"
    if getattr(norm, "bias", None) is None:
        return f"a LayerNorm without bias {where}"
    return None


def _size(value: Any) -> int | list[int]:
    h, w = (int(v) for v in value) if isinstance(value, list | tuple) else (value, value)
    return h if h == w else [h, w]


def describe(model: Any) -> tuple[dict[str, Any], list[str]]:
    """(the ViTConfig fields of a timm model, what this package cannot run in it)."""
    problems: list[str] = []

    def refuse(text: str | None) -> None:
        if text and text not in problems:
            problems.append(text)

    if _kind(model) not in MODEL_CLASSES:
        refuse(f"the model class {_kind(model)}")
    blocks = list(model.blocks)
    block = blocks[0]
    for kind in sorted({_kind(b) for b in blocks}):
        if kind != "Block":
            refuse(BLOCKS.get(kind, f"{kind} blocks"))
    embed = model.patch_embed
    if _kind(embed) != "PatchEmbed":
        refuse(f"a {_kind(embed)} patch embedding (a CNN stem or other)")
    if not _identity(getattr(embed, "norm", None)):
        where = "in the patch embedding"
        refuse(_norm_problem(embed.norm, where) or f"a LayerNorm {where}")
    width = int(model.embed_dim)
    grid, patch = embed.grid_size, embed.patch_size
    fields: dict[str, Any] = {
        "hidden_size": width,
        "num_hidden_layers": len(blocks),
        "patch_size": _size(embed.patch_size),
        # what the patches cover: timm's conv drops the pixels a patch does not fill
        # (so400m at 384: 27 patches of 14 = 378)
        "image_size": _size([g * p for g, p in zip(grid, patch, strict=True)]),
        "num_channels": int(embed.proj.in_channels),
        "patch_embedding_bias": embed.proj.bias is not None,
        "use_class_token": model.cls_token is not None,
        "num_register_tokens": int(getattr(model, "num_reg_tokens", 0) or 0),
        "use_distillation_token": getattr(model, "dist_token", None) is not None,
        "no_embed_class": bool(model.no_embed_class),
        "use_pre_norm": not _identity(model.norm_pre),
        "use_final_norm": not (_identity(model.norm) and _identity(model.fc_norm)),
        "use_fc_norm": not _identity(model.fc_norm),
        "num_labels": int(model.num_classes),
    }
    if model.pos_embed is None:
        refuse("no learned position embeddings")
    pool = model.global_pool
    if pool not in POOLING:
        refuse(f"global_pool={pool!r} pooling")
    fields["pooling_type"] = POOLING.get(pool, pool)
    # The twins pool (average, MAP head) the patch tokens only, as timm does by default.
    prefix, include = int(model.num_prefix_tokens), bool(getattr(model, "pool_include_prefix", 0))
    if prefix and include and pool in ("avg", "map"):
        refuse("pooling that reads the prefix tokens too (pool_include_prefix)")

    if _kind(block) == "Block":
        attn, mlp = block.attn, block.mlp
        no_proj_bias = False
        fields["qkv_bias"] = attn.qkv.bias is not None if _kind(attn) == "Attention" else True
        if _kind(attn) != "Attention":
            refuse(ATTENTIONS.get(_kind(attn), f"{_kind(attn)} attention"))
        else:
            fields["num_attention_heads"] = int(attn.num_heads)
            if attn.num_heads * attn.head_dim != width:
                refuse("an attention width other than the model width")
            if not (_identity(attn.q_norm) and _identity(attn.k_norm)):
                refuse("query/key normalisation (qk_norm)")
            if getattr(attn, "gate", None) is not None:
                refuse("a gated attention output")
            if not _identity(attn.norm):
                refuse("extra LayerNorms inside attention and MLP (sub-LN)")
            no_proj_bias = attn.proj.bias is None
        act = getattr(mlp, "act", None)
        if _kind(mlp) == "Mlp":
            fields["intermediate_size"] = int(mlp.fc1.out_features)
            if mlp.fc1.bias is None or mlp.fc2.bias is None:
                refuse("an MLP without biases")
        elif _kind(mlp) == "GluMlp":
            fields["use_swiglu_ffn"] = True
            fields["intermediate_size"] = int(mlp.fc2.in_features)  # the gated width
            if mlp.gate_last:
                refuse("a gated MLP that gates with its second half (GluMlp gate_last=True)")
        elif _kind(mlp) == "SwiGLU":
            fields["intermediate_size"] = int(mlp.fc2.in_features)
            refuse("SwiGLU with separate gates")
        else:
            refuse(f"a {_kind(mlp)} MLP")
        if not _identity(getattr(mlp, "norm", None)):
            refuse("extra LayerNorms inside attention and MLP (sub-LN)")
        if no_proj_bias:
            refuse("no bias on the attention output projection")
        fields["hidden_act"] = _activation(act)
        if fields["hidden_act"] is None:
            refuse(f"the activation {_kind(act)}")
        scales = {_kind(block.ls1), _kind(block.ls2)}
        if scales == {"LayerScale"}:
            values = {float(block.ls1.init_values), float(block.ls2.init_values)}
            if len(values) > 1:
                refuse("different layer-scale values on the two branches")
            fields["layerscale_value"] = values.pop()
        elif scales != {"Identity"}:
            refuse(f"layer scale {' / '.join(sorted(scales))}")
        norms = [("in the blocks", block.norm1), ("in the blocks", block.norm2)]
        norms += [("before the blocks", model.norm_pre), ("after the blocks", model.norm)]
        norms += [("after pooling", model.fc_norm)]
        eps = set()
        for where, norm in norms:
            if not _identity(norm):
                refuse(_norm_problem(norm, where))
                eps.add(float(getattr(norm, "eps", 0.0)))
        if len(eps) > 1:
            refuse(f"norms with different eps ({sorted(eps)})")
        if eps:
            fields["layer_norm_eps"] = max(eps)
    else:
        heads = getattr(getattr(block, "attn", None), "num_heads", None)
        fields["num_attention_heads"] = int(heads) if heads else None

    pooler = getattr(model, "attn_pool", None)
    if pool == "map" and pooler is not None:
        refuse(_map_head_problem(pooler, fields, block))
    elif pooler is not None:
        refuse(f"a {_kind(pooler)} pooling head")
    if _kind(model) == "VisionTransformerDistilled" and not fields["use_distillation_token"]:
        refuse("a distilled model without a distillation token")
    return {k: v for k, v in fields.items() if v is not None}, problems


def _map_head_problem(pooler: Any, fields: dict[str, Any], block: Any) -> str | None:
    """What in timm's AttentionPoolLatent departs from the MAP head the twins compute."""
    if _kind(pooler) != "AttentionPoolLatent":
        return f"a {_kind(pooler)} pooling head"
    checks = [
        (pooler.latent_len == 1, "a MAP head with more than one probe"),
        (pooler.num_heads == fields.get("num_attention_heads"), "a MAP head with its own heads"),
        (pooler.pos_embed is None, "a MAP head with position embeddings"),
        (pooler.pool == "token", f"a MAP head pooled by {pooler.pool!r}"),
        (_kind(pooler.q) == "Linear" and pooler.q.bias is not None, "a MAP head without biases"),
        (pooler.kv.bias is not None, "a MAP head without biases"),
        (_identity(pooler.q_norm) and _identity(pooler.k_norm), "a MAP head with qk_norm"),
        (pooler.mlp is not None, "a MAP head without its MLP"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    if int(pooler.mlp.fc1.out_features) != fields.get("intermediate_size"):
        return "a MAP head MLP of another width than the blocks'"
    if _kind(pooler.mlp.act) != _kind(block.mlp.act):
        return "a MAP head MLP with another activation than the blocks'"
    return _norm_problem(pooler.norm, "in the MAP head")


def family_name(name: str) -> str | None:
    return next((label for prefix, label in FAMILY_NAMES if name.startswith(prefix)), None)


def row(name: str, model: Any = None) -> dict[str, Any]:
    """One name's row: the fields that differ from TIMM_BASE, or {"refused": reason}."""
    model = build(name) if model is None else model
    fields, problems = describe(model)
    if problems:
        label = family_name(name)
        reason = " + ".join(problems) + (f" ({label})" if label else "")
        return {"refused": reason}
    return {k: v for k, v in fields.items() if k not in TIMM_BASE or TIMM_BASE[k] != v}


def _resolved(entry: dict[str, Any]) -> dict[str, Any]:
    return entry if "refused" in entry else {**TIMM_BASE, **entry}


def tag_entry(arch_row: dict[str, Any], tag_row: dict[str, Any]) -> dict[str, Any]:
    """What a tag's row changes against its architecture's ({} when nothing)."""
    if "refused" in tag_row or "refused" in arch_row:
        return {} if tag_row == arch_row else tag_row
    arch, tag = _resolved(arch_row), _resolved(tag_row)
    changed = {k: v for k, v in tag.items() if arch.get(k) != v}
    removed = [k for k in arch if k not in tag]
    if removed:  # a field the tag's model lacks (not expected): keep the whole row
        return tag_row
    return changed


def generate(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The table for `names` (default: every architecture and tag of the two modules)."""
    import timm

    archs, tags = timm_names()
    if names is not None:
        wanted = set(names)
        archs = sorted({n.split(".")[0] for n in wanted} & set(archs) | (wanted & set(archs)))
        tags = sorted(wanted & set(tags))
    arch_rows = {name: row(name) for name in archs}
    tag_rows = {}
    for tag in tags:
        arch = tag.split(".")[0]
        if arch not in arch_rows:
            arch_rows[arch] = row(arch)
        tag_rows[tag] = tag_entry(arch_rows[arch], row(tag))
    return {"timm_version": timm.__version__, "architectures": arch_rows, "tags": tag_rows}


def dumps(table: dict[str, Any]) -> str:
    """Sorted JSON, one architecture or tag per line (a small, readable diff)."""

    def block(entries: dict[str, Any]) -> str:
        lines = [
            f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True, separators=(',', ':'))}"
            for k, v in sorted(entries.items())
        ]
        return "{\n" + ",\n".join(lines) + "\n  }"

    return (
        "{\n"
        f'  "generated_by": "scripts/generate_timm_names.py",\n'
        f'  "timm_version": {json.dumps(table["timm_version"])},\n'
        f'  "architectures": {block(table["architectures"])},\n'
        f'  "tags": {block(table["tags"])}\n'
        "}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = dumps(generate())
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run scripts/generate_timm_names.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    table = json.loads(text)
    refused = sum("refused" in v for v in table["architectures"].values())
    print(
        f"{args.out}: {len(table['architectures'])} architectures ({refused} refused), "
        f"{len(table['tags'])} pretrained tags, timm {table['timm_version']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
