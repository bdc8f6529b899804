"""The ``lookupc`` command (:mod:`.main`: the group, entry point and error handling), one
module per command (:mod:`.inspect`, :mod:`.convert`, :mod:`.compile`, :mod:`.run`,
:mod:`.tune`, :mod:`.compare`, :mod:`.doctor`, :mod:`.keygen`, ``lookupc memo`` in
:mod:`.memo`), the options they share (:mod:`.options`), their common plumbing
(:mod:`.common`) and text input for ``lookupc run`` (:mod:`.text`). ``python -m
lookupc.cli`` runs it too."""
