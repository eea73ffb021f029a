"""The paged session store: codec (blobs, manifests), backends (memory, file, Redis), the
torch-free index and memory tier. engine/sessions.py puts them together."""
