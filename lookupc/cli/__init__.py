"""The ``lookupc`` command (:mod:`.main`), with ``lookupc memo`` (:mod:`.memo`) and text
input for ``lookupc run`` (:mod:`.text`). ``python -m lookupc.cli`` runs it too."""
