"""``python -m mailout.cli``: the ``mailout`` command."""
import sys

from mailout.cli import main

sys.exit(main())
