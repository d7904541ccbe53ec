"""The `online-llm` command: start the Ray Serve application on a local Ray, or build the tiny model.

`online-llm serve` is what `scripts/serve.sh` runs: it starts Ray and Serve in this process, deploys
`serve.app.builder:build_app` with the options given, prints how to call the service and blocks until
Ctrl-C. It knows nothing about engines or stores beyond passing their settings to the builder.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading

logger = logging.getLogger("online_llm")

APP_NAME = "online-llm"


def _serve_args(args: argparse.Namespace) -> dict:
    """AppConfig fields from the command line; unset options keep the config's defaults."""
    config: dict = {}
    if args.model:
        config["model"] = args.model
    if args.store:
        config["store_url"] = args.store
    if args.workers:
        config["num_workers"] = args.workers
    if args.api_key:
        config["api_key"] = args.api_key
    return config


def _usage(host: str, port: int, base_model: str) -> str:
    url = f"http://{host}:{port}"
    return f"""
online-llm is serving {base_model} at {url}  (Ctrl-C stops it)

  curl -s {url}/v1/models
  curl -s {url}/v1/adapters/alice/learn -H 'content-type: application/json' \\
       -d '{{"examples": [{{"prompt": "What is my favourite colour?", "response": "Blue."}}]}}'
  curl -s {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "alice", "prompt": "What is my favourite colour?", "max_tokens": 8, "temperature": 0}}'

  Python:  openai.OpenAI(base_url="{url}/v1", api_key="unused")
  Handle:  ray.serve.get_app_handle("{APP_NAME}")
"""


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve.app.builder import build_app
    from serve.app.config import AppConfig

    config = AppConfig(**_serve_args(args))  # validate before starting anything
    # "local" starts a Ray of our own even when another one runs on this machine; --address joins one.
    ray.init(address=args.address, num_cpus=None if args.address != "local" else args.num_cpus,
             include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config.model_dump(exclude_unset=True)), name=APP_NAME, route_prefix="/")
    print(_usage(args.host, args.port, config.model), flush=True)
    if args.no_block:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from serve.tiny_model import BENCH_SPEC, TinyModelSpec, build_tiny_model

    print(build_tiny_model(args.dest, BENCH_SPEC if args.bench else TinyModelSpec(), force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-llm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="start the service on a local Ray and block")
    run.add_argument("--model", help="HF id or local model dir (default: the embedded tiny model)")
    run.add_argument("--store", help="adapter store URL (default: $LORA_SAVE_PATH)")
    run.add_argument("--workers", type=int, help="worker replicas (default: one per GPU, else 1)")
    run.add_argument("--api-key", help="require Authorization: Bearer <key>")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray")
    run.add_argument("--address", default="local", help="Ray address to join (default: start a local Ray)")
    run.add_argument("--no-block", action="store_true", help="deploy, print, and return")
    run.set_defaults(func=cmd_serve)
    build = sub.add_parser("build-model", help="build the embedded tiny model and print its directory")
    build.add_argument("--dest")
    build.add_argument("--bench", action="store_true", help="the larger benchmark model")
    build.add_argument("--force", action="store_true")
    build.set_defaults(func=cmd_build_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
