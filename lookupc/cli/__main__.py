"""``python -m lookupc.cli``: the ``lookupc`` command."""

from .main import main

main()
