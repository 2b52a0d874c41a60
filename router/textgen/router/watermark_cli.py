"""`textgen-watermark detect FILE`: check a text for the watermark, offline.

The same test as the router's `POST /watermark/detect`: the model's tokenizer
(resolved as the launcher resolves `--model-id`), the key, gamma and z
threshold given as flags. Prints the detection as JSON; FILE `-` is stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from textgen.router.watermark import WatermarkConfig, detect

DEFAULTS = WatermarkConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("textgen-watermark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    detect_cmd = commands.add_parser("detect", help="score a text file for the watermark")
    detect_cmd.add_argument("file", help="the text to check; - reads stdin")
    model = detect_cmd.add_mutually_exclusive_group()
    model.add_argument("--model-id", help="as the launcher's; default: the built-in model")
    model.add_argument("--model-dir", type=Path, help="a local dir with the tokenizer")
    detect_cmd.add_argument("--revision")
    detect_cmd.add_argument("--cache-dir", type=Path)
    detect_cmd.add_argument("--watermark-key", default=DEFAULTS.key)
    detect_cmd.add_argument("--watermark-gamma", type=float, default=DEFAULTS.gamma)
    detect_cmd.add_argument("--watermark-z-threshold", type=float, default=DEFAULTS.z_threshold)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = WatermarkConfig(
            key=args.watermark_key,
            gamma=args.watermark_gamma,
            z_threshold=args.watermark_z_threshold,
        )
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        token_ids = _tokenizer(args)(text, add_special_tokens=False)["input_ids"]
        detection = detect(token_ids, config)
    except (OSError, ValueError) as error:
        parser.exit(2, f"textgen-watermark: error: {error}\n")
    print(json.dumps(detection.to_json()))
    return 0


def _tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    model_dir = args.model_dir
    if model_dir is None:
        # Imported here: resolving the model (and its conversion) is the launcher's job.
        from textgen.launcher.model import ModelError, resolve_model

        try:
            model_dir = resolve_model(args.model_id, args.revision, args.cache_dir)
        except ModelError as error:
            raise ValueError(str(error)) from None
    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":
    sys.exit(main())
