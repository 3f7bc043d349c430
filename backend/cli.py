"""The `safetrain` command: up, api, worker, serve, keys, models, migrate, train."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from backend.training.tiny_models import make_tiny_model

    folder = make_tiny_model(
        args.name, arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads, context=args.context
    )
    print(folder)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from backend.db.migrations import upgrade_to_head

    upgrade_to_head()
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from backend.services.keys import create_key_for_project_name

    print(create_key_for_project_name(args.project))
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from backend.services.keys import revoke_key_by_value

    try:
        revoke_key_by_value(args.key)
    except ValueError as error:
        print(f"safetrain keys revoke: {error}", file=sys.stderr)
        return 1
    print("revoked", file=sys.stderr)
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    from backend.api.app import serve

    serve(host=args.host, port=args.port)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from backend.workers.celery_app import run_worker

    run_worker(concurrency=args.concurrency)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from backend.inference.server import serve

    serve(host=args.host, port=args.port, device=args.device)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from backend.workers.embedded import run_embedded

    run_embedded(host=args.host, port=args.port, demo_model=args.demo_model)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from backend.training.train_safe import main as train_main

    return train_main(args.train_args)


def build_parser() -> argparse.ArgumentParser:
    """The parser for every `safetrain` subcommand."""
    parser = argparse.ArgumentParser(prog="safetrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="migrate, then run the API and one worker on the embedded default")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--demo-model", action="store_true", help="build the tiny demo model if it is missing")
    up.set_defaults(func=_cmd_up)

    api = commands.add_parser("api", help="run the HTTP API alone")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=_cmd_api)

    worker = commands.add_parser("worker", help="run one Celery training worker")
    worker.add_argument("--concurrency", type=int, default=1, help="training processes (one per GPU)")
    worker.set_defaults(func=_cmd_worker)

    serve = commands.add_parser("serve", help="run the embedded inference engine alone (what the API proxies to)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default SAFETRAIN_INFERENCE_PORT (8001)")
    serve.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default SAFETRAIN_INFERENCE_DEVICE)")
    serve.set_defaults(func=_cmd_serve)

    commands.add_parser("migrate", help="bring the database schema to the latest version").set_defaults(
        func=_cmd_migrate
    )

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="print a new API key for a project (created if new)")
    create.add_argument("--project", required=True)
    create.set_defaults(func=_cmd_keys_create)
    revoke = keys.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key")
    revoke.set_defaults(func=_cmd_keys_revoke)

    models = commands.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("make-tiny", help="build a small random-weight model with a local tokenizer")
    tiny.add_argument("name", help="folder to write")
    tiny.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--context", type=int, default=512)
    tiny.set_defaults(func=_cmd_models_make_tiny)

    train = commands.add_parser("train", help="the trainer (same flags as training/train_safe.py)")
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safetrain` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["train"]:  # everything after `train` is train_safe.py's, flags included
        return _cmd_train(argparse.Namespace(train_args=arguments[1:]))
    args = build_parser().parse_args(arguments)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
