"""`python -m handi_jax.convert {import,inspect}`: see handi_jax/convert/cli.py."""

from handi_jax.convert.cli import main

main()
