"""``python -m portable_brn.conformance``: the conformance matrix (see ``cli``)."""

import sys

from .cli import main

sys.exit(main())
