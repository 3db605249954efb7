"""``python -m vpit_fast.train``: the same as ``vpit-train``."""

import sys

from vpit_fast.train.loop import main

sys.exit(main())
