"""`python -m server [options]`: same as `vace-local serve`."""

from server.cli import main

main()
