"""``python -m fastgpt`` (and ``torchrun -m fastgpt``): the ``fastgpt`` command."""
import sys

from .cli import main

sys.exit(main())
