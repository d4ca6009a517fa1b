"""`python -m conversion SRC -o OUT [options]`: any ViT checkpoint -> a canonical folder.

Parsing only; the work is `conversion.convert`. Errors the package foresees end as one
`error: ...` line and exit status 2 (`--debug` shows the traceback); a failed `--verify`
prints its table and exits 1, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "python -m conversion"
EXAMPLES = f"""\
examples:
  {PROG} vit_base_patch16_224.pth -o ./vit-b16
  {PROG} B_16-i21k-300ep.npz -o ./vit-b16-jax --verify
  {PROG} ./hf-vit-folder -o ./vit-b16-384 --image-size 384 --interpolation bicubic
  {PROG} model.safetensors -o ./vit-s16 --from timm --set num_attention_heads=6
  {PROG} ./old-out -o ./new-out --dtype bfloat16 --force
  {PROG} timm/vit_base_patch16_224.augreg2_in21k_ft_in1k -o ./vit-b16-augreg2

Sources, recognised from the file itself:
  timm   state dict in .pth/.pt/.bin ({{"model": ...}}, {{"state_dict": ...}}, module.
         prefixes) or .safetensors, or a timm hub folder; plain ViT only
  jax    google-research/vision_transformer and big_vision .npz files
  hf     transformers folder or file: model.safetensors, pytorch_model.bin, sharded
         *.index.json checkpoints, Flax flax_model.msgpack
A Hugging Face repo id (namespace/name) that is not a local path is read from the local
Hugging Face cache (HF_HUB_CACHE / HF_HOME), offline; nothing is ever downloaded.

Exit status: 0 converted, 1 --verify found a mismatch (nothing written), 2 error."""


def parse_assignment(text: str) -> tuple[str, Any]:
    """FIELD=VALUE; VALUE is read as JSON when it parses (numbers, true, [224, 448]),
    else taken as a string (gelu_pytorch_tanh)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE, e.g. num_attention_heads=12; got {text!r}"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    from conversion.convert import DTYPES, GELU, SOURCES
    from vit_core.resample import INTERPOLATIONS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a timm, original-JAX/big_vision or Hugging Face ViT checkpoint "
        "into one folder (model.safetensors + config.json + preprocessor_config.json) that "
        "vit_torch, vit_flax and transformers all load.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", metavar="SRC",
        help="checkpoint file or folder, e.g. vit.pth, model.safetensors, ./hf-folder, or a "
        "Hugging Face repo id in the local cache (never downloaded), e.g. "
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    )  # fmt: skip
    parser.add_argument(
        "--revision", metavar="REV",
        help="branch, tag or commit hash of a repo id SRC in the local Hugging Face cache; "
        "default: main, e.g. --revision v1.0",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--out", type=Path, required=True, metavar="OUT",
        help="output folder, written atomically, e.g. -o ./vit-b16",
    )  # fmt: skip
    parser.add_argument(
        "--from", dest="source", choices=SOURCES, default="auto",
        help="source kind; default: auto (detected from the file), e.g. --from timm",
    )  # fmt: skip
    parser.add_argument(
        "--model-name", metavar="NAME",
        help="a model name for what the weights do not say (timm's head count; a timm name "
        "also its family's eps, activation and switches), any ecosystem's spelling; --set "
        "overrides it, e.g. --model-name vit_small_patch14_dinov2.lvd142m "
        "--set num_hidden_layers=2",
    )  # fmt: skip
    parser.add_argument(
        "--config", dest="config_file", type=Path, metavar="FILE",
        help="config.json (transformers' or timm's) whose fields apply, e.g. --config cfg.json",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", type=parse_assignment, default=[],
        metavar="FIELD=VALUE",
        help="give or override one config field (repeatable; VALUE as JSON), e.g. "
        "--set num_attention_heads=12 --set layer_norm_eps=1e-6 --set image_size=[224,448]",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", metavar="H[xW]",
        help="resample the position embeddings to this input size, e.g. --image-size 384 "
        "or --image-size 384x512",
    )  # fmt: skip
    parser.add_argument(
        "--interpolation", choices=INTERPOLATIONS,
        help="resampling mode for --image-size; default: the source's own (timm: "
        "bicubic_antialias, transformers: bicubic), e.g. --interpolation bicubic",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=DTYPES,
        help="stored weight dtype; default: the source's, e.g. --dtype bfloat16",
    )  # fmt: skip
    parser.add_argument(
        "--gelu", choices=tuple(GELU),
        help="MLP activation, overriding the source's (timm/HF: exact, JAX: tanh), "
        "e.g. --gelu exact",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action="store_true",
        help="before writing, run a probe batch through both backends (and the source "
        "library where installed) and compare, e.g. --verify",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true",
        help="replace OUT if it exists (the old folder is removed only after the new one "
        "is in place), e.g. --force",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars, e.g. --quiet")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors, e.g. --debug"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert; print the summary (and the --verify table). Exit status as in EXAMPLES."""
    args = build_parser().parse_args(argv)
    from conversion.convert import convert, summary
    from conversion.verify import VerificationError
    from vit_core.errors import ViTError

    try:
        result = convert(
            args.src,
            args.out,
            source=args.source,
            model_name=args.model_name,
            config_file=args.config_file,
            overrides=dict(args.overrides),
            image_size=args.image_size,
            interpolation=args.interpolation,
            dtype=args.dtype,
            gelu=args.gelu,
            verify=args.verify,
            force=args.force,
            progress=False if args.quiet else None,
            revision=args.revision,
        )
    except VerificationError as exc:
        if args.debug:
            raise
        print(exc.report.format())
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ViTError, ImportError) as exc:  # ImportError: a framework a reader needs
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if result.verification is not None:
        print(result.verification.format())
    return 0
