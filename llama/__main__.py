"""`python -m llama ...` (and `torchrun -m llama ...`) run the command line."""

import sys

from llama.cli import main

sys.exit(main())
