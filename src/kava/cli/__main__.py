"""``python -m kava.cli``: the ``kava`` command (as ``accelerate launch``/``torchrun`` run it)."""

import sys

from . import main

sys.exit(main())
