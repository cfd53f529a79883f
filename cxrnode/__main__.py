"""``python -m cxrnode`` runs the command line, like the ``cxrnode`` script."""

from cxrnode.cli import main

main()
