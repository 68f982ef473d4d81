"""``python -m pynsbook`` is the ``pynsbook`` command."""
import sys

from .cli import main

sys.exit(main())
