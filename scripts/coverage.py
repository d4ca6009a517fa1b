"""How much of timm's ViT zoo converts: every pretrained tag, converted and run, vs timm.

    python scripts/coverage.py                       # every tag (minutes; `make coverage`)
    python scripts/coverage.py --only 'siglip|clip'  # the tags matching a regex, merged
                                                     # into the existing docs/coverage.json

For each pretrained tag of timm's `vision_transformer` and `deit` modules: build the
architecture (`timm.create_model(tag, pretrained=False, depth=2)`, depth 1 where the
width passes 1024: the width, heads, MLP, image size, tokens and head are the tag's),
perturb every tensor with seeded noise (LayerScale gammas near 0.3, matrices by
1/sqrt(fan-in)), save the state dict, convert it as a user would
(`conversion.convert(..., model_name=tag, overrides={"num_hidden_layers": depth})`), run
the folder in both backends (`vit_core.loading.folder_outputs`) and compare with timm on
the same pixels: the logits (a tag with a head), the image embedding
(`forward_head(pre_logits=True)` vs `pooler_output`, or the class token of a
transformers-compatible folder, which has no pooler output; not for DeiT distilled,
whose pre-logits is the mean of two tokens) and every token (`forward_features` vs
`last_hidden_state`).

A tag is "converted" when every compared output is within BOUND in both backends,
"mismatch" when it converted but is not, "refused" when the package said no with one of
its own errors (`vit_core.ViTError`; the message is recorded), and "traceback" for any
other exception: that is a bug, printed in full. A refused tag is converted once more
without its name, to record whether its keys alone are refused too. Tags that build the
same model under the same hints (one architecture, a head of the same size) are run once;
the others' rows say `same_as`.

Writes docs/coverage.json; `scripts/readme_tables.py` renders the README's summary from
it (`make coverage` runs both).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "coverage.json"
MODULES = ("vision_transformer", "deit")
BOUND = 1e-4
WIDE = 1024  # wider models are built one block deep
LAYERSCALE = 0.3
SEED = 0


def tags() -> list[str]:
    import timm

    return sorted({t for m in MODULES for t in timm.list_models(module=m, pretrained=True)})


def depth_for(width: int) -> int:
    return 1 if width > WIDE else 2


def build(tag: str) -> Any:
    """timm's model for the tag, cut to its coverage depth, every tensor perturbed."""
    import timm
    import torch

    with torch.device("meta"):
        width = int(timm.create_model(tag, pretrained=False, depth=1).embed_dim)
    depth = depth_for(width)
    torch.manual_seed(SEED)
    model = timm.create_model(tag, pretrained=False, depth=depth)
    perturb(model, SEED)
    return model.eval(), depth


def perturb(model: Any, seed: int) -> None:
    """Noise on every tensor, so that no weight keeps its init and activations stay near
    unit size: vectors N(0, 0.1^2) (LayerNorm scales about 1), matrices std
    1/sqrt(fan-in) (the patch kernel a tenth of that), LayerScale gammas about 0.3."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for key, p in sorted(model.named_parameters()):
            shape = tuple(p.shape)
            noise = rng.standard_normal(shape).astype(np.float32)
            if key.endswith("gamma") or key.endswith(("gamma_1", "gamma_2")):
                value = LAYERSCALE + 0.05 * noise
            elif p.ndim in (2, 4) and not key.endswith(("_token", "pos_embed", "latent")):
                fan_in = int(np.prod(shape[1:]))
                std = (0.1 if p.ndim == 4 else 1.0) / math.sqrt(fan_in)
                value = p.numpy() + std * noise
            else:
                value = p.numpy() + 0.1 * noise
            p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def timm_outputs(model: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """What the folder must give on the same pixels."""
    import torch

    distilled = hasattr(model, "dist_token")
    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(pixels))
        out = {"last_hidden_state": features}
        if not distilled:
            out["embedding"] = model.forward_head(features, pre_logits=True)
        if model.num_classes:
            out["logits"] = model.forward_head(features)
    return {k: v.float().numpy() for k, v in out.items()}


def embedding(outputs: dict[str, Any], config: Any) -> np.ndarray | None:
    """The folder's image embedding: `pooler_output`, or, for a transformers-compatible
    folder (which returns none, as transformers' ViTModel), its class token."""
    if outputs.get("pooler_output") is not None:
        return np.asarray(outputs["pooler_output"])
    if config.transformers_compatible and "last_hidden_state" in outputs:
        return np.asarray(outputs["last_hidden_state"])[:, 0]
    return None


def _diff(got: np.ndarray | None, want: np.ndarray) -> float:
    if got is None or got.shape != want.shape:
        return math.inf
    return float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vit-coverage-") as folder:
        yield Path(folder)


def check(tag: str, backends: tuple[str, ...]) -> dict[str, Any]:
    """One tag's row of the report."""
    import torch

    from conversion import convert
    from vit_core.config import ViTConfig
    from vit_core.errors import ViTError
    from vit_core.loading import folder_outputs
    from vit_core.names import family

    started = time.perf_counter()
    row: dict[str, Any] = {"tag": tag, "family": family(tag)}
    stage = "building the timm model"
    try:
        model, depth = build(tag)
        row["depth"] = depth
        with scratch() as folder:
            source = folder / f"{tag}.pth"
            torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, source)
            stage = "converting"
            try:
                convert(
                    source,
                    folder / "out",
                    model_name=tag,
                    overrides={"num_hidden_layers": depth},
                    progress=False,
                )
            except ViTError as exc:
                row.update(status="refused", message=str(exc).replace(str(folder), "<tmp>"))
                row["unnamed"] = _unnamed(source, folder, depth)
                return row
            stage = "running"
            config = ViTConfig.from_pretrained(folder / "out")
            height, width = (int(s) for s in model.patch_embed.img_size)
            rng = np.random.default_rng(SEED + 1)
            pixels = rng.standard_normal((1, config.num_channels, height, width))
            pixels = pixels.astype(np.float32)
            want = timm_outputs(model, pixels)
            ours = np.ascontiguousarray(pixels[:, :, : config.image_hw[0], : config.image_hw[1]])
            compared: dict[str, dict[str, float]] = {}
            for backend in backends:
                got = dict(folder_outputs(folder / "out", backend, ours))
                got["embedding"] = embedding(got, config)
                compared[backend] = {k: _diff(got.get(k), v) for k, v in want.items()}
                row[backend] = max(compared[backend].values())
                del got
                gc.collect()
            row["outputs"] = compared
            worst = max(_number(row[b]) for b in backends)
            row["status"] = "converted" if worst <= BOUND else "mismatch"
    except ViTError as exc:  # after the conversion: loading or running the folder
        row.update(status="refused", message=f"{stage}: {exc}")
    except Exception:
        text = traceback.format_exc()
        row.update(status="traceback", message=f"{stage}: {text.strip().splitlines()[-1]}")
        print(f"\n--- {tag}: traceback while {stage}\n{text}", file=sys.stderr, flush=True)
    finally:
        row["seconds"] = round(time.perf_counter() - started, 1)
        model = None
        gc.collect()
        _clear_jax()
    return row


def same_model(tag: str) -> tuple[str, str]:
    """Tags of one architecture whose names give the same fields build the same model
    (timm's tag changes only the head size, pooling, channels or input size, and all four
    are in the fields) and convert with the same hints."""
    from vit_core.errors import ConfigError
    from vit_core.names import name_fields

    try:
        fields = json.dumps(name_fields(tag), sort_keys=True)
    except ConfigError as exc:
        fields = str(exc).replace(tag, "")
    return tag.split(".")[0], fields


def reuse(row: dict[str, Any], tag: str) -> dict[str, Any]:
    """The row of a tag that builds the same model as `row`'s."""
    from vit_core.names import family

    text = json.dumps(row).replace(row["tag"], tag)
    out = {**json.loads(text), "tag": tag, "family": family(tag), "seconds": 0.0}
    return {**out, "same_as": row["tag"]}


def _unnamed(source: Path, folder: Path, depth: int) -> str:
    """What converting a refused tag's state dict without its name does."""
    from conversion import convert
    from vit_core.errors import ViTError

    try:
        convert(source, folder / "unnamed", overrides={"num_hidden_layers": depth}, progress=False)
    except ViTError as exc:
        return "refused: " + str(exc).replace(str(folder), "<tmp>")
    except Exception as exc:
        return f"traceback: {type(exc).__name__}: {exc}"
    return "converted (the keys alone do not give it away)"


def _clear_jax() -> None:
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


# ------------------------------------------------------------------- the report
def summary(rows: list[dict[str, Any]]) -> str:
    """The table printed at the end (every tag) and the share converted."""
    lines = [f"{'tag':58} {'family':10} {'status':10} {'torch':>9} {'flax':>9}"]
    for row in rows:
        diffs = [f"{_number(row[b]):9.2e}" if b in row else " " * 9 for b in ("torch", "flax")]
        lines.append(f"{row['tag']:58} {row['family']:10} {row['status']:10} " + " ".join(diffs))
        if row["status"] in ("refused", "traceback", "mismatch") and row.get("message"):
            lines.append(f"    {row['message'][:200]}")
    converted = sum(r["status"] == "converted" for r in rows)
    lines.append(
        f"\n{converted}/{len(rows)} tags ({converted / max(len(rows), 1):.1%}) converted "
        f"within {BOUND:g} in both backends; "
        + ", ".join(f"{s}: {n}" for s, n in sorted(_count(rows, "status").items()))
    )
    return "\n".join(lines)


def _count(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[key]] = counts.get(row[key], 0) + 1
    return counts


def write(rows: list[dict[str, Any]], path: Path, merge: bool) -> list[dict[str, Any]]:
    import timm

    old = {}
    if merge and path.is_file():
        old = {r["tag"]: r for r in json.loads(path.read_text())["rows"]}
    old.update({r["tag"]: r for r in rows})
    everything = [old[t] for t in sorted(old)]
    report = {
        "generated_by": "scripts/coverage.py",
        "timm_version": timm.__version__,
        "bound": BOUND,
        "depth": f"2 blocks, 1 where the width passes {WIDE}",
        "rows": everything,
    }
    path.write_text(json.dumps(_finite(report), indent=1, sort_keys=True) + "\n")
    return everything


def _finite(value: Any) -> Any:
    """JSON has no infinity: an output that could not be compared (missing, or of another
    shape) is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: Any) -> float:
    return math.inf if value is None else float(value)


# ----------------------------------------------------------- the README's table
FAMILY_ORDER = ("plain", "CLIP", "SigLIP", "DINOv2", "registers", "DeiT", "DeiT-3", "MAE", "gap")
FAMILY_ORDER += ("other",)


def reason(row: dict[str, Any]) -> str:
    """A refusal's reason, without the tag (so that tags group by it)."""
    message = str(row.get("message", ""))
    if match := re.match(rf"^{re.escape(row['tag'])}: (.*) is not supported", message):
        return match[1]
    return message.split("; ")[0][:120]


def render(report: dict[str, Any]) -> str:
    """The README's summary: per family, what converts and how closely; the refusals."""
    rows = report["rows"]
    bound = report["bound"]
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    lines = [
        f"| family | tags | converted (<= {bound:g}) | refused | other | largest diff torch "
        "| largest diff flax | where |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [f for f in FAMILY_ORDER if f in families] + sorted(set(families) - set(FAMILY_ORDER))
    for name in order:
        group = families[name]
        counts = _count(group, "status")
        ran = [r for r in group if "torch" in r or "flax" in r]

        def diff(r: dict[str, Any], backend: str) -> float:
            return _number(r[backend]) if backend in r else 0.0

        worst = max(ran, key=lambda r: max(diff(r, "torch"), diff(r, "flax")), default=None)
        largest = [f"{max(diff(r, b) for r in ran):.1e}" if ran else "-" for b in ("torch", "flax")]
        others = len(group) - counts.get("converted", 0) - counts.get("refused", 0)
        lines.append(
            f"| {name} | {len(group)} | {counts.get('converted', 0)} | {counts.get('refused', 0)} "
            f"| {others} | {largest[0]} | {largest[1]} | {worst['tag'] if worst else '-'} |"
        )
    converted = sum(r["status"] == "converted" for r in rows)
    reasons: dict[str, int] = {}
    for row in rows:
        if row["status"] == "refused":
            reasons[reason(row)] = reasons.get(reason(row), 0) + 1
    lines.append(
        f"\n{converted} of {len(rows)} pretrained timm {report['timm_version']} tags "
        f"({converted / max(len(rows), 1):.0%}) convert and match timm within {bound:g} in "
        f"both backends ({report['depth']}; `make coverage`, every tag in "
        "`docs/coverage.json`). Refused, by reason:\n"
    )
    lines += [f"- {text}: {n}" for text, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", metavar="PATTERN", help="tags matching this regex (merged)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--backends", default="torch,flax")
    args = parser.parse_args(argv)

    import torch

    torch.set_grad_enabled(False)
    backends = tuple(args.backends.split(","))
    wanted = [t for t in tags() if args.only is None or re.search(args.only, t)]
    rows = []
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for index, tag in enumerate(wanted, 1):
        key = same_model(tag)
        if key in done:  # the same model, seed and hints: the same result, not run again
            row = reuse(done[key], tag)
        else:
            row = done[key] = check(tag, backends)
        rows.append(row)
        diffs = " ".join(f"{b} {_number(row[b]):.2e}" for b in backends if b in row)
        print(
            f"[{index}/{len(wanted)}] {tag}: {row['status']} {diffs} ({row['seconds']} s)",
            flush=True,
        )
    everything = write(rows, args.out, merge=args.only is not None)
    print(summary(rows))
    if args.only is not None:
        converted = sum(r["status"] == "converted" for r in everything)
        print(f"{args.out}: {converted}/{len(everything)} converted in all")
    return 1 if any(r["status"] == "traceback" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
