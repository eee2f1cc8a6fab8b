"""``python -m graphnorm``: the command line."""

from .cli import main

main()
