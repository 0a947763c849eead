"""``python -m agent``: the same as the ``tether-agent`` console script."""

import sys

from .cli import main

sys.exit(main())
