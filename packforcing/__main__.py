import sys

try:
    from packforcing.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: one line, like any other moment
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
