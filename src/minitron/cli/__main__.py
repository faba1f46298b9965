"""`python -m minitron.cli ...` (and `torchrun -m minitron.cli run recipe.yaml`)."""

import sys

from minitron.cli.commands import main

sys.exit(main())
