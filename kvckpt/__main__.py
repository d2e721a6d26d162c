"""``python -m kvckpt``: the same as the ``kvckpt`` command."""

import sys

from kvckpt.cli.main import main

sys.exit(main())
