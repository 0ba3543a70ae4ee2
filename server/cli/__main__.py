"""``python -m edgeota.server.cli``: the ``edgeota`` command without its console script."""

import sys

from edgeota.server.cli import main

sys.exit(main())
