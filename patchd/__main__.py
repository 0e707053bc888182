"""``python -m patchd`` is the ``patchd`` command."""

from patchd.cli import main

main()
