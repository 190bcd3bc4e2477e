"""llmpack serve FILE — an OpenAI-compatible HTTP server with a chat page.

Endpoints: POST /v1/chat/completions and POST /v1/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, GET /health (503 while the model loads), and a chat page at /
(works offline). Requests run one at a time, in arrival order (one generation already uses every
core of a laptop); a request of the same conversation re-uses the KV cache of the previous one,
so only its new tokens are prefilled. A client that disconnects stops its generation at the
next token (a prefill under way finishes first).

The server listens on loopback (127.0.0.1) unless --host says otherwise; with another address,
set --api-key (or LLMPACK_API_KEY): clients then send 'Authorization: Bearer KEY'.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

from llmpack.formats.errors import LlmpackError

from .cmd_generate import add_backend_args, load_model
from .model import default_backend

EXAMPLE = """examples:
  llmpack serve qwen05.llmpack                      # then open http://127.0.0.1:8080/
  llmpack serve qwen05.llmpack --port 9000 --backend numpy
  LLMPACK_API_KEY=secret llmpack serve qwen05.llmpack --host 0.0.0.0
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'
"""


def _parser():
    p = argparse.ArgumentParser(prog="llmpack serve", description=__doc__.split("—")[1].split("\n")[0].strip(),
                                epilog=__doc__.split("\n", 2)[2] + "\n" + EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("LLMPACK_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LLMPACK_API_KEY; none)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests queued or running before new ones get 503 'busy' (default 64)")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification at load")
    add_backend_args(p)
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so a busy port is a one-line error and port 0 works)."""
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as e:
        raise LlmpackError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host")
    return sock


def check_args(args):
    if not 0 <= args.port <= 65535:
        raise LlmpackError("--port must be in 0..65535")
    if args.max_queue < 1:
        raise LlmpackError("--max-queue must be at least 1")
    if not Path(args.file).is_file():
        raise LlmpackError(f"no such file: {args.file}")
    from llmpack.formats.reader import Pack

    Pack(args.file, verify=False)  # a file that is not a pack fails here, before the server starts


def _load(args):
    t0 = time.perf_counter()
    model = load_model(args)
    print(f"llmpack serve: ready ({args.backend or default_backend()} backend, context {model.context_length} tokens, "
          f"loaded in {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return model


def main(argv) -> int:
    args = _parser().parse_args(argv)
    check_args(args)
    if not is_loopback(args.host) and not args.api_key:
        print(f"llmpack serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              f"this machine can use the model", file=sys.stderr)
    import uvicorn

    from .server import Service, build_app

    sock = bind(args.host, args.port)
    failure: list[str] = []

    def load_failed(message: str):
        failure.append(message)
        server.should_exit = True

    service = Service(lambda: _load(args), Path(args.file).stem, args.api_key, args.max_queue, load_failed)
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"llmpack serve: http://{shown}:{port}/ (chat page; OpenAI API at /v1), loading {args.file}",
          file=sys.stderr, flush=True)
    service.start_loading()
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
    if failure:
        raise LlmpackError(f"cannot load {args.file}: {failure[0]}")
    return 0
