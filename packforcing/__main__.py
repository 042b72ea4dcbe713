from packforcing.cli import main

raise SystemExit(main())
