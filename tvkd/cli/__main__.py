"""`python -m tvkd.cli`: the same as the `tvkd` console script."""

from tvkd.cli import main

raise SystemExit(main())
