"""How trimmed files leave and come back: the local stash and the package-manager backends
(dpkg, rpm) that keep the package manager's view of the system truthful.

``select.detect_backend(root)`` picks the package-manager backend for a root.
"""
