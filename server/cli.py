"""The `mcserve` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
        "loaded_as": model.source,
        "fingerprint": model.fingerprint,
        "parameters": model.num_parameters(),
        "tokenizer_vocab": model.tokenizer.vocab_size if model.tokenizer else None,
        "config": model.config.to_dict(),
    }, indent=2))


def load_model(path: str | None):
    import models
    try:
        return models.load(path or models.default_model_path())
    except (models.ModelLoadError, OSError) as e:
        raise CLIError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingError, SamplingParams
    model = load_model(args.model)
    tok = model.tokenizer
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                                stop_token_ids=tuple(tok.eos_ids))
    except SamplingError as e:
        raise CLIError(str(e)) from None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.render_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    ids = tok.encode(text)
    if not ids:
        raise CLIError("the prompt is empty")
    if not args.chat:
        print(args.prompt, end="", flush=True)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=2048, num_device_blocks=
                                           len(ids) // model.config.segment_size + args.max_tokens // 8 + 8,
                                           num_host_blocks=0))
    engine.add_request(ids, params)
    while engine.has_unfinished():
        for out in engine.step():
            print(out.new_text, end="", flush=True)
    print()


def cmd_train(args: argparse.Namespace) -> None:
    from models.config import ConfigError
    from models.train import TrainConfig, Trainer
    overrides = dict(parse_assignment(a) for a in args.set)
    if args.config:
        try:
            overrides = {**json.loads(Path(args.config).read_text()), **overrides}
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"cannot read --config {args.config}: {e}") from None
        overrides.pop("vocab_size", None)
    options = {k: v for k, v in vars(args).items() if k in TRAIN_OPTIONS and v is not None}
    try:
        cfg = TrainConfig(data=args.data, out=args.out, model=overrides, **options)
        trainer = Trainer(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    summary = trainer.train()
    print(json.dumps(summary))


TRAIN_OPTIONS = {"tokenizer": str, "vocab_size": int, "steps": int, "batch_size": int, "seq_len": int,
                 "lr": float, "min_lr_ratio": float, "warmup": int, "weight_decay": float,
                 "grad_clip": float, "dtype": str, "val_fraction": float, "val_every": int,
                 "val_batches": int, "ckpt_every": int, "seed": int, "device": str, "init_from": str,
                 "train_only": str}


TRAIN_HELP = {
    "tokenizer": "an existing tokenizer.json; without one a byte-level BPE is trained on the data",
    "vocab_size": "vocabulary of the trained tokenizer, in tokens", "steps": "optimizer steps",
    "batch_size": "sequences per step", "seq_len": "tokens per sequence", "lr": "peak learning rate",
    "min_lr_ratio": "the cosine schedule's floor, as a share of lr", "warmup": "linear warm-up, in steps",
    "weight_decay": "AdamW's decoupled weight decay", "grad_clip": "gradient norm clip",
    "dtype": "training precision: fp32 or bf16 (autocast)", "val_fraction": "share of the text held out",
    "val_every": "steps between validations", "val_batches": "batches per validation",
    "ckpt_every": "steps between checkpoints (exact resume)", "seed": "seed of data order and initialization",
    "device": "auto (cuda if visible), cpu or cuda", "init_from": "a saved or imported model to start from",
    "train_only": "all, or mc: freeze the model and train only what Memory Caching adds",
}


def train_defaults() -> dict:
    import dataclasses

    from models.train import TrainConfig
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_OPTIONS}


def parse_assignment(text: str) -> tuple[str, object]:
    from models.config import ConfigError, parse_setting
    try:
        return parse_setting(text)
    except ConfigError:
        raise CLIError(f"--set takes key=value, got {text!r}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import models
    from engine.options import ConfigError
    from server.config import OPTIONS, ServerConfig
    from server.serve import run_server
    given = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name, None) is not None}
    if args.set:
        given["model_set"] = ",".join(args.set)
    try:
        given = {name: parse_cli(name, text) for name, text in given.items()}
        config = ServerConfig.load(given, file=args.config)
        run_server(config)
    except (ConfigError, models.ModelLoadError, OSError) as e:
        raise CLIError(str(e)) from None


def parse_cli(name: str, text: str):
    from server.config import OPTIONS, parse
    opt = next(o for o in OPTIONS if o.name == name)
    return parse(opt, text, where="--" + name.replace("_", "-"))


def option_help(opt) -> str:
    """One option's line in --help: what it does, its unit, choices, default and variable."""
    default = "on" if opt.default is True else "off" if opt.default is False else repr(opt.default)
    if opt.secret:
        default = "none"
    facts = [f"unit: {opt.unit}"] if opt.unit else []
    if opt.choices:
        facts.append("one of " + ", ".join(map(str, opt.choices)))
    elif opt.kind is bool:
        facts.append("on or off")
    facts += [f"default: {default}", opt.env]
    return f"{opt.help} ({'; '.join(facts)})"


SERVE_EPILOG = ("Every option can also be set by its MCSERVE_* variable or in a YAML file (--config FILE.yaml, "
                "or MCSERVE_CONFIG; keys are the option names, e.g. 'num_device_blocks: 4096'). Precedence: "
                "command line > environment > file > defaults. The effective configuration is logged at start, "
                "secrets masked.")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    from server.config import OPTIONS
    groups = {"": serve.add_argument_group("server"), "engine": serve.add_argument_group("engine"),
              "limits": serve.add_argument_group("session store limits")}
    for opt in OPTIONS:
        if opt.name == "model_set":
            continue  # given as --set KEY=VALUE, below
        metavar = "|".join(opt.choices) if opt.choices else ("on|off" if opt.kind is bool else opt.kind.__name__.upper())
        groups[opt.path[0] if len(opt.path) > 1 else ""].add_argument(
            "--" + opt.name.replace("_", "-"), dest=opt.name, metavar=metavar, help=option_help(opt))
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a model config key set on load, repeatable (MCSERVE_MODEL_SET: KEY=VALUE,...), e.g. "
                            "--set aggregation=residual --set segment_size=128 on an imported checkpoint")
    serve.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (MCSERVE_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcserve", description="Memory Caching LM server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server (default: the bundled model "
                                         "on 127.0.0.1:8000)", epilog=SERVE_EPILOG)
    add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="show a model's config, size and fingerprint")
    info.add_argument("model", help="model directory")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model directory (default: the bundled model)")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1] (default: 0.95)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off (default: 0)")
    gen.add_argument("--min-p", type=float, default=0.0,
                     help="drop tokens under this share of the likeliest one's probability; 0 = off (default: 0)")
    gen.add_argument("--seed", type=int, help="seed of the sampler (default: none, a fresh draw each run)")
    gen.add_argument("--chat", action="store_true", help="render the prompt as a user turn of the chat template")
    gen.add_argument("--system", help="system message for --chat")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train an MC model on text files")
    train.add_argument("data", nargs="+", help="UTF-8 text files")
    train.add_argument("--out", required=True, help="output directory (a loadable model + train state)")
    train.add_argument("--config", help="JSON file of model config keys")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a model config key, e.g. --set memory=gla --set segment_size=64")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.epilog = ("--init-from DIR starts from a saved or imported model (and its tokenizer); --train-only mc "
                    "freezes it and trains only what Memory Caching adds, e.g. --init-from DIR --train-only mc "
                    "--set aggregation=grm")
    defaults = train_defaults()
    for name, kind in TRAIN_OPTIONS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, dest=name,
                           help=f"{TRAIN_HELP[name]} (default: {defaults[name]!r})")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad options: argparse prints usage + one line, exit 2
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
