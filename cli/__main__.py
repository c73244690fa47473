"""`python -m cli`: the same as the `picstream` console script."""

from cli.main import run

run()
