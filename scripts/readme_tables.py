"""Write the README's measured tables from the files the measurements produced.

    python scripts/readme_tables.py          # rewrite README.md's generated sections
    python scripts/readme_tables.py --check  # exit 1 if README.md differs (a test runs this)

Sources: `docs/parity.json`, the largest difference per comparison that the test suite
records (`pytest --parity-json`, run by `make readme`), `benchmarks/results/bench.json`
(`make bench`) and `docs/coverage.json` (`make coverage`). Each table sits between
`<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; nothing between the
markers is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from benchmarks.embed import render as render_embed  # noqa: E402
from benchmarks.run import render  # noqa: E402
from scripts.coverage import render as render_coverage  # noqa: E402

README = ROOT / "README.md"
PARITY = ROOT / "docs" / "parity.json"
BENCH = ROOT / "benchmarks" / "results" / "bench.json"
EMBED_BENCH = ROOT / "benchmarks" / "results" / "embed.json"
COVERAGE = ROOT / "docs" / "coverage.json"
BOUND = 1e-5

# What each recorded comparison holds our twins to, by the start of its name (tests name
# their comparisons "<reference>...: <output>"); the first matching pattern wins.
PARITY_GROUPS = (
    (r"torch b?float16 vs float32", "half precision vs float32, / output scale (2^-3, 2^-6)"),
    (r"(torch|flax|twins:) MIM", "masked image modeling vs transformers' PyTorch model, twins"),
    (r"(onnx|stablehlo)", "exported files (onnxruntime, jax.export) vs their twin"),
    (r"hub ", "repo ids from the local Hugging Face cache vs transformers, timm, conversion"),
    (r"gradient checkpointing", "gradient checkpointing on vs off: every gradient"),
    (r"(finetune|finetuned|torch DDP|JAX, 2)", "finetune: torch vs flax, 2 processes vs 1"),
    (r"twins: forward_intermediates", "our torch vs our flax: forward_intermediates"),
    (r"timm forward_intermediates", "timm's forward_intermediates vs our twins"),
    (r"twins: ", "our torch vs our flax, random architectures (hypothesis), every output"),
    (r"compiled torch ", "compile=True (torch.compile, frozen weights) vs eager"),
    (r"torch .*-> transformers", "folders written by our torch, loaded in transformers"),
    (r"flax .*-> transformers", "folders written by our flax, loaded in transformers"),
    (r"torch ", "our torch vs transformers (PyTorch): forward, losses, interpolation"),
    (r"flax ", "our flax vs transformers (Flax, PyTorch): forward, losses, interpolation"),
    (r"timm resample", "load-time resize vs timm's resample_abs_pos_embed"),
    (r"timm ", "timm checkpoints, converted, vs timm"),
    (r"jax npz", "original JAX / AugReg / big_vision .npz, converted, vs timm's loader"),
    (r"sincos2d", "big_vision's fixed sin-cos position table vs big_vision's formula"),
    (r"hf ", "Hugging Face checkpoints (safetensors, .bin, sharded, msgpack), converted"),
    (r"resample ", "position-embedding resampling vs its anchors (torch, timm, scipy)"),
    (r"(load-time|resized|head replaced|new-head)", "load-time resizing and head replacement"),
)


def parity_group(name: str) -> str:
    for pattern, group in PARITY_GROUPS:
        if re.match(pattern, name):
            return group
    raise ValueError(f"{PARITY}: comparison {name!r} fits no group of PARITY_GROUPS")


def render_parity(diffs: dict[str, float]) -> str:
    groups: dict[str, dict[str, float]] = {}
    for name, diff in diffs.items():
        groups.setdefault(parity_group(name), {})[name] = diff
    lines = [
        f"| compared (float32, bound {BOUND:g}) | named comparisons | largest max-abs diff "
        "| where |",
        "|---|---|---|---|",
    ]
    for _, group in PARITY_GROUPS:
        if group in groups:
            worst = max(groups[group], key=groups[group].__getitem__)
            lines.append(
                f"| {group} | {len(groups[group])} | {groups[group][worst]:.2g} | {worst} |"
            )
    lines.append(
        f"\n{len(diffs)} named comparisons in all, each a test assertion, and "
        f"`{PARITY.relative_to(ROOT)}` lists each."
    )
    return "\n".join(lines)


def sections() -> dict[str, str]:
    return {
        "parity": render_parity(json.loads(PARITY.read_text())),
        "speed": render(json.loads(BENCH.read_text())),
        "embed speed": render_embed(json.loads(EMBED_BENCH.read_text())),
        "coverage": render_coverage(json.loads(COVERAGE.read_text())),
    }


def rewrite(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(
            rf"(<!-- generated: {name} -->\n).*?(<!-- end generated: {name} -->)", re.S
        )
        if not pattern.search(text):
            raise ValueError(f"{README}: no <!-- generated: {name} --> section")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = rewrite(current, sections())
    if args.check:
        if wanted != current:
            print(f"{README} is stale: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
