"""``python -m qkov`` is the ``qkov`` command."""

import sys

from .cli import main

sys.exit(main())
