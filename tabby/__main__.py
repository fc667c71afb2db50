"""``python -m tabby`` is the ``tabby`` command."""

from tabby.cli import main

raise SystemExit(main())
