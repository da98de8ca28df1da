"""``python -m fastetcd``: the same as the ``fastetcd`` command."""

from fastetcd.cli import main

raise SystemExit(main())
