"""The node's uses of library internals, one module per library, each checked at start-up.

- :mod:`.pynetdicom`: the association cap's hooks, the requestor's lost rejections, the
  listener's rejections and receive configuration, and the optional receive tuning;
- :mod:`.uvicorn`: the web app's server without an idle tick.

(The model's uses of transformers' internals are in ``model/compat.py``: the model package
never imports the node.) Nothing outside these modules touches a private attribute of those
libraries: ``tests/node/test_compat_boundary.py`` walks the source to prove it.
"""
