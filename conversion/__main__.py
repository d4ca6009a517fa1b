"""`python -m conversion`: see `conversion.cli`."""

from conversion.cli import main

raise SystemExit(main())
