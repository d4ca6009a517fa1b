"""`python -m vit_core`: see `vit_core.cli`."""

from vit_core.cli import main

raise SystemExit(main())
