"""Command-line interface: parse arguments and hand over to one module per command."""

from __future__ import annotations

import argparse
import sys

BENCHMARKS = ("projector", "step", "comm", "checkpoint", "quality", "data", "memory", "optimizer",
              "activations")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lotus-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pre-train a LLaMA model (one process or under torchrun)",
                           epilog="Every key: lotus-train config --list. The config a command "
                                  "line resolves to: lotus-train config --show --config X "
                                  "--set ...")
    train.add_argument("--config", help="YAML file (configs/*.yaml); defaults if omitted")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")

    config = sub.add_parser("config", help="list every config key, or show a resolved config")
    shown = config.add_mutually_exclusive_group(required=True)
    shown.add_argument("--list", action="store_true",
                       help="every key with its type, default and meaning, and the presets")
    shown.add_argument("--show", action="store_true",
                       help="the config --config and --set resolve to, as config.yaml records it")
    config.add_argument("--config", help="YAML file for --show")
    config.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")

    compare = sub.add_parser("compare", help="one table of several runs, and their eval-loss "
                                             "curves by step and by wall time (PNG)")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default="compare.png", help="PNG to write ('' for none)")

    bench = sub.add_parser("bench", help="run a benchmark; prints a table and a JSON line")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="benchmark options (see --help)")

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sample = data_sub.add_parser("sample", help="write the embedded C4-layout sample corpus")
    sample.add_argument("--out", default="data/sample", help="output folder")
    prepare = data_sub.add_parser(
        "prepare", help="tokenize a corpus into a token store (data.path accepts it)")
    prepare.add_argument("--data", required=True,
                         help="hub name, local C4-layout folder, or one .jsonl/.json/.txt file")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer.json or hub name")
    prepare.add_argument("--out", required=True, help="store folder (an unfinished one resumes)")
    prepare.add_argument("--split", default=None,
                         help="comma-separated splits (default train,validation; train for a file)")
    prepare.add_argument("--max-tokens", type=int, default=None, help="at most N tokens per split")
    prepare.add_argument("--workers", type=int, default=None,
                         help="tokenizer processes (default: the CPU count)")
    prepare.add_argument("--shard-tokens", type=int, default=None,
                         help="tokens per shard (default 2^26: 128 MB of uint16)")
    prepare.add_argument("--on-error", default="skip", choices=["skip", "stop"],
                         help="malformed records and unreadable files: skip and count, or stop")
    prepare.add_argument("--hub-config", default=None, help="dataset config for a hub name")

    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face "
                                           "LlamaForCausalLM folder")
    export.add_argument("--run", required=True, help="run directory (run.dir of the run)")
    export.add_argument("--out", required=True, help="folder to write (replaced if present)")
    export.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the newest complete one)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to ship with the weights (default: the run's "
                             "data.tokenizer)")

    ev = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint or "
                                     "of an exported Hugging Face folder")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (run.dir of the run); an HF folder given "
                                      "here is evaluated as --hf")
    source.add_argument("--hf", help="HF LlamaForCausalLM folder (config.json + model.safetensors)")
    ev.add_argument("--step", type=int, default=None,
                    help="checkpoint step (default: the newest complete one)")
    ev.add_argument("--data", default=None, help="data.path (default: the run's)")
    ev.add_argument("--tokenizer", default=None,
                    help="data.tokenizer (default: the run's; an HF folder's tokenizer.json)")
    ev.add_argument("--split", default="validation", help="split of data.path to evaluate on")
    ev.add_argument("--batches", type=int, default=None,
                    help="eval.batches, of training.batch_size sequences (default: the run's)")
    ev.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE",
                    help="override a config key, e.g. training.seq_len (repeatable)")

    tok = sub.add_parser("tokenizer", help="tokenizer utilities")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", required=True, help="local corpus folder or file")
    tok_train.add_argument("--out", required=True, help="tokenizer.json to write")
    tok_train.add_argument("--vocab-size", type=int, default=32000)
    tok_train.add_argument("--max-docs", type=int, default=None,
                           help="train on at most this many documents")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "train":
        from launcher.train import main as train_main

        train_main(args.config, args.overrides)
    elif args.command == "config":
        import yaml

        from launcher.config import ConfigError, config_help, config_to_dict, load_config

        if args.list:
            print(config_help())
            return
        try:
            cfg = load_config(args.config, args.overrides)
        except (ConfigError, FileNotFoundError) as e:
            sys.exit(f"lotus-train: error: {e}")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    elif args.command == "compare":
        from launcher.compare import CompareError, compare_command

        try:
            compare_command(args.runs, args.out)
        except CompareError as e:
            sys.exit(f"lotus-train: error: {e}")
    elif args.command == "bench":
        from launcher.bench import run_benchmark

        run_benchmark(args.name, args.args)
    elif args.command == "data" and args.data_command == "prepare":
        from launcher.data import prepare_command

        prepare_command(args)
    elif args.command == "data":
        from lotus_dist.data import write_sample_corpus

        stats = write_sample_corpus(args.out)
        print(f"wrote sample corpus to {args.out}: {stats}")
    elif args.command == "export":
        from launcher.checkpoint import CheckpointError
        from launcher.config import ConfigError
        from launcher.export import export_run
        from lotus_dist.data import DataError

        try:
            out = export_run(args.run, args.out, args.step, args.dtype, args.tokenizer)
        except (CheckpointError, ConfigError, DataError) as e:
            sys.exit(f"lotus-train: error: {e}")
        print(f"exported {args.run} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    elif args.command == "eval":
        from launcher.checkpoint import CheckpointError
        from launcher.config import ConfigError
        from launcher.evaluate import eval_command
        from launcher.trainer import TrainingError
        from lotus_dist.data import DataError
        from lotus_dist.hf_export import HFFolderError

        try:
            eval_command(args)
        except (CheckpointError, ConfigError, DataError, HFFolderError, TrainingError,
                FileNotFoundError) as e:
            sys.exit(f"lotus-train: error: {e}")
    elif args.command == "tokenizer":
        from launcher.tokenizer_cli import train_tokenizer_command

        train_tokenizer_command(args.data, args.out, args.vocab_size, args.max_docs)
    else:  # argparse's required=True makes this unreachable; keep a clear message anyway
        sys.exit(f"unknown command {args.command}")
