"""``python -m omse ...`` (and ``torchrun --nproc-per-node N -m omse quantize ...``): the CLI."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
