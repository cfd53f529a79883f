"""The shape of the suite's full-width checkpoint (made once per run by ``conftest.py``)."""

#: Decoder layers of the checkpoint: the published widths, 2 of the published 32 layers.
LAYERS = 2
