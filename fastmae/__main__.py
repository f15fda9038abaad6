"""``python -m fastmae`` (also what ``torchrun -m fastmae`` runs): the ``fastmae`` command."""
import sys

from .cli import main

sys.exit(main())
