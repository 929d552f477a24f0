"""`mask2former serve`: the HTTP service and web page (needs the `serve` extra: FastAPI, uvicorn).

The listening socket is bound here, before the model loads, so a busy port is a one-line error and
`--port 0` picks a free port (printed). SIGTERM or Ctrl+C stop accepting connections, let the requests
in flight finish, then exit 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from mask2former.cli import DEVICE_HELP, UserError, example
from mask2former.cli.predict import add_scale_arguments

INSTALL_HINT = 'the serve extra is not installed: pip install -e ".[serve]"'


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="HTTP service with a web page (POST /predict, GET /)",
        epilog=example(
            "mask2former serve --port 8000   # then open http://127.0.0.1:8000/",
            "curl -F image=@photo.jpg 'http://127.0.0.1:8000/predict?task=panoptic'",
        ),
    )
    parser.add_argument(
        "--weights", default=None, help="checkpoint in any supported format (default: bundled model)"
    )
    parser.add_argument("--preset", default=None, help="architecture preset where the checkpoint needs one")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument(
        "--max-batch", type=int, default=8, help="images per forward pass at most (default: 8)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others (default: 5)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="batches run at the same time, one thread each"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model before 503")
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest request body (default: 20)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest decoded image, width x height"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (504)")
    parser.add_argument("--access-log", action="store_true", help="log one line per request")
    add_scale_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    from mask2former.serve.app import ServeSettings, create_app
    from mask2former.serve.limits import ServeLimits
    from mask2former.serve.memory import limit_heap_growth

    settings = _settings(args, ServeSettings, ServeLimits)
    limit_heap_growth()
    if args.weights is not None and not Path(args.weights).exists():
        raise UserError(f"--weights {args.weights}: no such file or folder")
    listener = _listen(args.host, args.port)
    host, port = listener.getsockname()[:2]
    failed: list[str] = []

    def load_predictor():
        from mask2former.cli.predict import apply_scale_arguments, make_predictor

        # The server keeps its own malloc settings (limit_heap_growth), not inference's.
        predictor = make_predictor(args.weights, args.preset, args.device, reuse_memory=False)
        apply_scale_arguments(predictor, args.short_edge, args.max_size)
        return predictor

    def on_load_error(error: BaseException) -> None:
        failed.append(" ".join(str(error).split()) or type(error).__name__)
        server.should_exit = True

    _log_to_stderr()
    app = create_app(load_predictor, settings, on_load_error)
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=args.access_log,
        # in-flight requests end within their own timeout; the drain waits that long at most
        timeout_graceful_shutdown=int(args.timeout) + 5,
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"mask2former serve: http://{shown}:{port}/ (GET /health is 200 once the model is loaded)", flush=True
    )
    # uvicorn re-raises the stop signal after its graceful shutdown; a drained stop should exit 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()
    if failed:
        raise UserError(f"the model could not be loaded: {failed[0]}")
    print("mask2former serve: stopped", file=sys.stderr)
    return 0


def _log_to_stderr() -> None:
    """Show the service's own log lines (model ready, load failures) beside uvicorn's."""
    import logging

    logger = logging.getLogger("mask2former.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _settings(args: argparse.Namespace, settings_class, limits_class):
    from mask2former.cli.checks import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check_args

    check_args(
        args,
        {
            "--max-batch": AT_LEAST_1,
            "--workers": AT_LEAST_1,
            "--max-queue": AT_LEAST_1,
            "--max-wait-ms": NON_NEGATIVE,
            "--max-upload-mb": POSITIVE,
            "--max-pixels": AT_LEAST_1,
            "--timeout": POSITIVE,
        },
    )
    limits = limits_class(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
    )
    return settings_class(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, workers=args.workers, limits=limits
    )


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line error naming the flags."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be 0..65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen ({error.strerror or error})") from None
    listener.set_inheritable(True)
    return listener
