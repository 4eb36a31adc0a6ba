"""Lets ``python -m pushsvc`` run the command-line interface."""

from pushsvc.cli import main

raise SystemExit(main())
