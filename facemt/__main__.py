"""``python -m facemt`` (and ``torchrun -m facemt``) is the ``facemt`` command."""

import sys

from facemt.cli import main

sys.exit(main())
