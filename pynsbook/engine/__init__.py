"""The container engine: the notebook side (``container``) and the side that runs inside
the new namespaces (``shim`` and ``init``), talking over one socket (``protocol``)."""
