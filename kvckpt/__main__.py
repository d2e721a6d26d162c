"""``python -m kvckpt``: the same as the ``kvckpt`` command."""

import sys

from kvckpt.cli import main

sys.exit(main())
