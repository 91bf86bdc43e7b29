"""`ossgpt serve --checkpoint DIR`: serve a model over OpenAI's HTTP API, with a web chat page.

    ossgpt serve --checkpoint gpt-oss-20b                  # http://127.0.0.1:8000: the page; /v1: the API
    ossgpt serve --checkpoint runs/demo --port 8080 --max-batch 8 --max-length 4096

Requests decode together (continuous batching, ossgpt.inference.engine): up to --max-batch at once, --max-queue
more waiting for a row, past that a 429. The KV cache holds --max-batch x --max-length tokens, allocated at start
(on the CPU, a cache larger than the memory available is an error naming the figure).
The sampling flags are the defaults of requests that leave temperature, top_p or seed out.
Needs the `serve` extra: pip install 'ossgpt[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ossgpt.cli import arguments
from ossgpt.errors import UserError
from ossgpt.inference.engine import cache_bytes
from ossgpt.inference.loading import CHECKED_CONTEXT
from ossgpt.inference.memory import GB, available_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arguments.add_loading(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 for every interface)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="requests decoded together (default: 16)")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a free row; more get 429 (default: 64)")  # fmt: skip
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="prompt + reply tokens of one request at most (default: the model's context, "
                        f"at most {CHECKED_CONTEXT})")  # fmt: skip
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the model's name in the API (default: the checkpoint folder's name)")  # fmt: skip
    arguments.add_sampling(parser, temperature=1.0, top_k=None)


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ossgpt serve needs {' and '.join(missing)}: pip install 'ossgpt[serve]'")
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-length", args.max_length or 2, 2), ("--port", args.port, 0)):  # fmt: skip
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    sampling = arguments.sampling(args)
    name = args.model_name or Path(args.checkpoint).resolve().name  # the folder named, model or training run
    model, tokenizer = arguments.load(args)
    if args.max_length and args.max_length > model.config.max_position_embeddings:
        raise UserError(f"--max-length {args.max_length} is more than the model's context of "
                        f"{model.config.max_position_embeddings} tokens")  # fmt: skip

    import uvicorn

    from ossgpt.serve.app import create_app, default_max_length

    max_length = args.max_length or default_max_length(model.config)
    if model.device.type == "cpu":  # the weights are loaded: what is still available is for the cache
        needed = cache_bytes(model.config, args.max_batch, max_length, model.dtype)
        available = available_memory()
        if available is not None and needed > available:
            raise UserError(f"the KV cache of --max-batch {args.max_batch} x --max-length {max_length} tokens needs "
                            f"{needed / GB:.1f} GB of memory, and this machine has {available / GB:.1f} GB available: "
                            "lower --max-length or --max-batch")  # fmt: skip
    app = create_app(model, tokenizer, name, args.max_batch, args.max_queue, max_length, sampling)
    print(f"serving {name} at http://{args.host}:{args.port} (chat page at /, OpenAI API at /v1); Ctrl-C stops",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
