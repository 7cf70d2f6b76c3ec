#!/usr/bin/env python
"""Run the attnsteer CLI from a source checkout, without installing it: ``python cli.py demo``.

Puts this checkout's root first on ``sys.path`` (so its ``attnsteer`` package is the one
imported) and calls :func:`attnsteer.cli.main`. Installed copies use the ``attnsteer`` console
script instead; this file is not part of the package.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path[:1]:
    sys.path.insert(0, ROOT)

from attnsteer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
