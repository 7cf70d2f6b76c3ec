"""``python -m attnsteer.cli ...`` (the same as the ``attnsteer`` console script)."""

import sys

from . import main

sys.exit(main())
