"""Inspection: every intermediate of the forward pass by name, and what can be done with it.

* ``tracing.py``  `tap`, the one hook the forward pass calls, and `trace`, which records or edits by name
* ``names.py``    the names of the intermediates, in forward order, and their position axes
* ``edits.py``    interventions for `trace(..., edits=...)`: `zero_head`, `patch_from`
* ``interp.py``   the logit lens, direct logit attribution, patching sweeps

docs/intermediates.md lists every name with its shape; docs/inspection.md shows how to use them.
"""
