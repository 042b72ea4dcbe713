"""The ``packforcing`` command line.

Each verb lives in its own module exposing ``register(subparsers)``; it sets
``func(args) -> int`` on its parser. Config problems print one line and exit with status 2;
other expected failures (a cache refusing non-finite values, a missing output directory)
print one line and exit with status 1. ``--debug`` (before or after the verb) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import select
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from packforcing.core.errors import ConfigError

VERBS = (
    "generate",
    "plan",
    "validate",
    "plugins",
    "presets",
    "train-compressor",
    "train-model",
    "encode-prompts",
    "sweep",
)
"""Modules under packforcing.cli, one per verb, in help order."""

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

LIGHT_VERBS = ("presets", "plugins")
"""Verbs that do not import torch (the others import it first, with interrupts held); ``plugins``
loads third-party plugin modules with interrupts held, in case one imports torch."""

EXAMPLES = """examples:
  packforcing generate --blocks 120 --out out/          # the default preset, 'packforcing'
  packforcing plan --config wan1.3b/packforcing --seconds 120
  packforcing validate configs/
  packforcing plugins
  packforcing presets
  packforcing train-compressor --config packforcing --steps 1000 --out W.safetensors
  packforcing encode-prompts --text-encoder WAN_DIR --prompts prompts.yaml --out embeds/
  packforcing train-model --config packforcing --out W.safetensors
  packforcing sweep full packforcing --seeds 0,1 --blocks 48 --out sweeps/a
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packforcing",
        description="Long-horizon autoregressive video generation with pluggable KV-cache memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES + "\n'packforcing VERB --help' shows each verb's options and an example.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"packforcing.cli.{verb.replace('-', '_')}").register(sub)
    return parser


def _version() -> str:
    from packforcing import __version__

    return __version__


class UsageError(ValueError):
    """Options that argparse accepts one by one but not together (``--resume`` with
    ``--config``, ``generate`` without ``--out`` or ``--resume``): reported as argparse reports a
    bad option, the verb's usage and ``packforcing VERB: error: ...``, exit status 2."""


def add_verb(
    sub: argparse._SubParsersAction, name: str, *, help: str, description: str, example: str
) -> argparse.ArgumentParser:
    """A verb's parser with the shared conventions: description, an example and ``--debug``."""
    parser = sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_debug(parser)
    parser.set_defaults(verb_parser=parser)  # its usage, for a UsageError
    return parser


def add_debug(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` after the verb too."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. policy.recent_frames=8 (YAML-typed, repeatable, applied last)",
    )


def one_line(exc: BaseException) -> str:
    """An exception as one line (internal newlines folded)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def plugin_warnings_on_one_line() -> Iterator[None]:
    """Show plugin problems and deprecated config keys as ``warning: ...`` lines (once each)
    instead of Python's two-line warning format."""
    from packforcing.core.errors import DeprecatedKeyWarning
    from packforcing.plugins.manager import PluginWarning

    original = warnings.showwarning
    ours = (PluginWarning, DeprecatedKeyWarning)

    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ours):
            text = one_line(message)
            if text not in shown:  # a config read twice (plan, then build) warns once
                shown.add(text)
                print(f"warning: {text}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        for category in ours:
            warnings.simplefilter("default", category)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = original


def _non_finite(exc: BaseException) -> bool:
    """``exc`` is the cache's refusal of NaN/Inf values (its module is loaded by then if so)."""
    store = sys.modules.get("packforcing.core.store")
    return store is not None and isinstance(exc, store.NonFiniteError)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (a write fails with EPIPE)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll
        return False


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: a :class:`KeyboardInterrupt` saying which signal it was."""
    raise KeyboardInterrupt(f"interrupted ({signal.Signals(signum).name})")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`KeyboardInterrupt` as Ctrl-C does, so every verb
    stops the same way (one line, exit 130; ``train-model`` saves its weights on the way out)
    instead of dying silently. Only where SIGTERM still has its default action and on the main
    thread: a program that set its own handler keeps it; ``generate`` routes it while it runs."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; Ctrl-C or SIGTERM at any moment (start-up included) exits 130 in
    one line."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_interrupt():
            return _main(argv)
    except BrokenPipeError as exc:
        if not _stdout_closed():
            if debug:
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE
        # the reader of our output went away (``packforcing presets --json | head -1``): stop
        # quietly, and point stdout at /dev/null so that flushing it at exit does not complain
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        if debug:
            raise
        # Python's own Ctrl-C carries no message: it is SIGINT (SIGTERM raises with its name)
        print(f"error: {one_line(exc) if str(exc) else 'interrupted (SIGINT)'}", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def stop_signals_to(handler: Any) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` (a function or ``signal.SIG_IGN``) inside the
    block, restoring the previous handlers after it; a no-op off the main thread, where signals
    are not ours to take. A signal ignored when the block starts stays ignored: the shell starts
    a background job (``generate ... &`` in a script) with SIGINT ignored, so that a Ctrl-C
    meant for the foreground does not stop it, and Python leaves that as it found it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, handler)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise :class:`KeyboardInterrupt` for one.

    For importing torch: its native modules run Python code from C++ while they load, and an
    interrupt raised there cannot unwind (the process aborts with a C++ error, exit -6) or is
    swallowed. Held, the signal arrives a moment later as an ordinary Ctrl-C (one line, exit 130).
    """
    held: list[int] = []
    with stop_signals_to(lambda signum, frame: held.append(signum)):
        yield
    if held:
        raise KeyboardInterrupt(f"interrupted ({signal.Signals(held[0]).name})")


def import_torch() -> None:
    """Import torch with interrupts held (see :func:`interrupts_held`); when this call is what
    loads it, freeze the collector's objects afterwards.

    torch leaves ~170,000 long-lived objects tracked by the garbage collector. Frozen
    (:func:`gc.freeze`, moved to the permanent generation), they are no longer traversed by every
    later full collection, nor by the one at interpreter exit: ~0.25 s of a ``plan`` or
    ``validate`` run on a 2-core machine, more than the rest of the verb (see "Start-up and
    threads" in the README). The collector keeps running for everything created afterwards; only
    what is unreachable at this moment (a few dozen objects) is never reclaimed. A process that
    had torch already (a test session, a program calling :func:`main`) is left as it is.
    """
    if "torch" in sys.modules:
        return
    with interrupts_held():
        import torch  # noqa: F401  (see interrupts_held)
    gc.freeze()


def _main(argv: Sequence[str] | None = None) -> int:
    from packforcing.core.errors import PluginError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.verb not in LIGHT_VERBS:
        import_torch()
    try:
        with plugin_warnings_on_one_line():
            return int(args.func(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        args.verb_parser.error(str(exc))  # usage, then the line; exits with status 2
        raise  # not reached: error() exits
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except (LookupError, ValueError, OSError, PluginError) as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            raise  # the reader went away: main() stops quietly
        if args.debug:
            raise
        if _non_finite(exc):
            print(f"error: non-finite values refused by the cache (not stored): {one_line(exc)}", file=sys.stderr)
        else:
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
