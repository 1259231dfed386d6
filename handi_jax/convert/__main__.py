"""`python -m handi_jax.convert {import,inspect}`: see handi_jax/convert/cli.py."""

import sys

from handi_jax.convert.cli import main

sys.exit(main())
