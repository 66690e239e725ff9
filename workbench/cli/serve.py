"""``workbench serve BUNDLE_OR_RUN``: an HTTP prediction server (FastAPI + uvicorn) for one bundle.

A run id is served with its newest verified bundle. The server has no password, so, like
``workbench ui``, it listens on 127.0.0.1 unless told otherwise; any other ``--host`` needs
``--allow-remote`` (or ``WORKBENCH_ALLOW_OPEN=1``, the UI's switch), else exit code 2.
``--device`` (auto, cpu, cuda, cuda:N; default WORKBENCH_DEVICE, else auto) says where ONNX
Runtime runs; a GPU asked for but absent is exit code 2 too, before the bundle is read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from core.names import is_id
from workbench import auth


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from core.bundle import BundleError
    from core.train.robustness import DeviceError
    from workbench.compute import check_ort_device
    from workbench.predictor import Predictor
    from workbench.serve import MB, MEGAPIXEL, ServeLimits, create_app

    allowed_open = os.environ.get(auth.ENV_ALLOW_OPEN, "").strip() == "1"
    if not auth.is_loopback(args.host) and not (args.allow_remote or allowed_open):
        return _fail(f"Refusing to serve predictions on {args.host}: this server has no password (and "
                     "WORKBENCH_PASSWORD_HASH protects the web UI only), so anyone who can reach this machine "
                     "could use it. Use --host 127.0.0.1 (the default), or pass --allow-remote if something in "
                     "front of it (a firewall, a proxy) already controls who gets in.")
    for name in ("max_image_mb", "max_request_mb", "max_image_megapixels", "max_request_megapixels", "queue_timeout"):
        if getattr(args, name) <= 0:
            return _fail(f"--{name.replace('_', '-')} must be more than 0")
    for name, least in (("max_images", 1), ("workers", 1), ("queue", 0)):
        if getattr(args, name) < least:
            return _fail(f"--{name.replace('_', '-')} must be at least {least}")
    target = Path(args.target)
    try:
        check_ort_device(args.device)  # before any bundle is read
        # Only ASCII digits are a run id ("²".isdigit() is true, and int() refuses it).
        if target.exists() and not is_id(args.target):
            predictor = Predictor.load(target, allow_unsigned=args.allow_unsigned, device=args.device)
        elif is_id(args.target):
            predictor = Predictor.from_run(int(args.target), allow_unsigned=args.allow_unsigned, device=args.device)
        else:
            return _fail(f"{args.target!r} is neither a bundle (.zip or unpacked folder) nor a run id")
    except DeviceError as e:
        return _fail(str(e))
    except BundleError as e:
        return _fail(f"cannot serve {args.target}: {e}")
    limits = ServeLimits(max_image_bytes=int(args.max_image_mb * MB), max_request_bytes=int(args.max_request_mb * MB),
                         max_images=args.max_images, max_image_pixels=int(args.max_image_megapixels * MEGAPIXEL),
                         max_request_pixels=int(args.max_request_megapixels * MEGAPIXEL), workers=args.workers,
                         queue_size=args.queue, queue_timeout_s=args.queue_timeout)
    app = create_app(predictor, limits)

    import uvicorn

    print(f"Serving {len(predictor.labels)} classes ({predictor.describe()}) on http://{args.host}:{args.port} "
          f"with the model on {predictor.runs_on} (ONNX Runtime {predictor.provider}) "
          f"(API docs at /docs). Ctrl-C stops it.", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a bundle's (or run's) predictions over HTTP")
    p.add_argument("target", metavar="BUNDLE_OR_RUN", help="bundle zip or unpacked folder, or a run id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --allow-remote)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen beyond this machine although the server has no password")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="accept an unsigned bundle although WORKBENCH_BUNDLE_KEY is set (its files are still checked)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="largest image accepted (default 10 MB)")
    p.add_argument("--max-request-mb", type=float, default=50.0, help="largest request accepted (default 50 MB)")
    p.add_argument("--max-images", type=int, default=32, help="most images per request (default 32)")
    p.add_argument("--max-image-megapixels", type=float, default=40.0,
                   help="largest image accepted, from its header before decoding (default 40 megapixels)")
    p.add_argument("--max-request-megapixels", type=float, default=100.0,
                   help="most pixels per request, all images together (default 100 megapixels: about 1.5 s "
                        "of decoding on one core)")
    p.add_argument("--workers", type=int, default=2,
                   help="requests decoded and classified at once (default 2: one per core of a 2-core machine)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait for a worker; more get 503 busy (default 8)")
    p.add_argument("--queue-timeout", type=float, default=10.0,
                   help="longest a request waits for a worker before 503 busy (default 10 s)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where ONNX Runtime runs the model: auto, cpu, cuda, cuda:N "
                        "(default: WORKBENCH_DEVICE, else auto)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
