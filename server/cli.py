"""The `mcserve` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys


class CLIError(Exception):
    """A user error: printed as one line, no traceback."""


def cmd_info(args: argparse.Namespace) -> None:
    import models
    try:
        model = models.load(args.model, require_tokenizer=False)
    except (models.ModelLoadError, OSError) as e:
        raise CLIError(str(e)) from None
    print(json.dumps({
        "path": str(args.model),
        "fingerprint": model.fingerprint,
        "parameters": model.num_parameters(),
        "tokenizer_vocab": model.tokenizer.vocab_size if model.tokenizer else None,
        "config": model.config.to_dict(),
    }, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcserve", description="Memory Caching LM server")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a model's config, size and fingerprint")
    info.add_argument("model", help="model directory")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CLIError as e:
        print(f"mcserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
