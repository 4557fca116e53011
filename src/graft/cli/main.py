"""`graft`: the command-line entry point. Errors print as one clear message, not a traceback."""

from __future__ import annotations

import sys

import typer

from graft.cli import (
    Interrupted, check, compare, demo, evaluate, export, inspect, predict, serve, show_features, train,
)
from graft.cli.options import flag
from graft.errors import ConfigError, GraftError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

app = typer.Typer(
    name="graft",
    help="Transfer learning on images: adapt a pretrained backbone to your labelled images, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(name="demo")(demo.demo)
app.command(name="inspect")(inspect.inspect)
app.command(name="check")(check.check)
app.command(name="train")(train.train)
app.command(name="predict")(predict.predict)
app.command(name="evaluate")(evaluate.evaluate)
app.command(name="show-features")(show_features.show_features)
app.command(name="compare")(compare.compare)
app.command(name="export")(export.export)
app.command(name="serve")(serve.serve)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some inputs failed, 2 usage or data error)."""

    try:
        # Without standalone mode click returns a command's exit code instead of exiting.
        code = app(args=argv, standalone_mode=False)
    except GraftError as error:
        print(f"graft: error: {_in_flags(error)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as interrupt:
        print(f"graft: interrupted{'; ' + str(interrupt) if isinstance(interrupt, Interrupted) else ''}", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as error:  # usage errors of click, or of the click that newer typer vendors
        if isinstance(error, (typer.Exit, _click_class("Exit"))):
            return int(getattr(error, "exit_code", 0))
        if isinstance(error, (typer.Abort, _click_class("Abort"))):
            print("graft: interrupted", file=sys.stderr)
            return 130
        if isinstance(error, _usage_error_classes()):
            error.show()
            return 2
        raise
    if code == EXIT_INTERRUPTED:  # typer returns Ctrl-C as this code: no command exits with it
        print("graft: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def _in_flags(error: Exception) -> str:
    """The message of `error` with the parameter it names shown as the flag that sets it (`lr` -> `--lr`)."""

    if isinstance(error, ConfigError) and error.parameter:
        return f"{flag(error.parameter)}: {error.message}"
    return str(error)


def _click_class(name: str) -> type:
    import click

    return getattr(click.exceptions, name)


def _usage_error_classes() -> tuple[type, ...]:
    """ClickException from click and, where typer vendors its own click (typer ≥ 0.2x), typer's."""
    vendored = getattr(typer, "TyperException", None)
    return (_click_class("ClickException"),) + ((vendored,) if vendored else ())


if __name__ == "__main__":
    sys.exit(main())
