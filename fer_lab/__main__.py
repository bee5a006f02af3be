"""``python -m fer_lab``: see :mod:`fer_lab.cli`."""
import sys

from .cli import main

sys.exit(main())
