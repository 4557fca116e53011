"""`graft serve BUNDLE`: the HTTP API and web page for a bundle, with uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from graft.cli import options
from graft.errors import ConfigError
from graft.extras import require_extra
from graft.ranges import PORT, UPLOAD_MB, check_number


def serve(
    bundle: Path = typer.Argument(..., help="A bundle folder (or the run folder that holds one)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Labels per image unless a request asks otherwise."),
    max_upload_mb: float = typer.Option(10.0, help="Largest image file accepted, in MiB."),
    max_images: int = typer.Option(16, help="Most image files accepted in one request."),
    max_megapixels: int = typer.Option(50, help="Most pixels one image may declare, in millions (checked before decoding)."),
    max_request_megapixels: int = typer.Option(200, help="Most pixels the images of one request may declare together, in millions."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical, error, warning, info, debug or trace."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request (uvicorn)."),
    unknown: str = typer.Option("auto", "--unknown", help=options.UNKNOWN_HELP),
    threshold: float | None = typer.Option(
        None, "--threshold", help=options.THRESHOLD_HELP + " A request's own ?threshold= takes precedence."
    ),
) -> None:
    """Serve a bundle: POST /predict, GET /healthz, a web page at / and API docs at /docs.

    A multi-label bundle answers each image's label set, each label at its stored threshold."""

    (uvicorn,) = require_extra("serve", "uvicorn")
    from uvicorn.config import LOG_LEVELS

    from graft.serve import create_app  # fastapi is the serve extra's

    check_number("port", port, PORT)
    check_number("max_upload_mb", max_upload_mb, UPLOAD_MB)
    log_level = log_level.lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    app = create_app(
        bundle, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_images=max_images, top_k=top_k,
        max_pixels=max_megapixels * 1_000_000, max_request_pixels=max_request_megapixels * 1_000_000, unknown=unknown,
        threshold=threshold,
    )
    print(f"graft: serving {app.state.bundle.path} on http://{host}:{port}/ (API docs at /docs)", file=sys.stderr)
    # One process: the model is loaded once and inference runs in the thread pool.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
