"""``patchd demo``: the whole loop on one machine.

A base model is trained with a spurious colour shortcut and registered as production; a FastAPI
model server serves it and ships every prediction to ``patchd serve``; a production stream shifts
toward the minority colour, the monitor sees the subgroup fail, a patch run retrains the model, a
person (or ``--approve``) promotes it, the model server reloads, and live worst-group accuracy
recovers.
"""
