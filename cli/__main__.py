"""``python -m edgeota.cli``: the ``edgeota`` command without its console script."""

import sys

from edgeota.cli import main

sys.exit(main())
