"""``python -m hearth`` is the ``hearth`` command."""

import sys

from .cli import main

sys.exit(main())
