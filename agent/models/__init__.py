"""The model store: the catalogue of known models, GGUF metadata, downloads, imports and the files on disk.

- :mod:`hearth.models.gguf` reads a GGUF file's header and metadata (never its tensors).
- :mod:`hearth.models.catalogue` loads ``profiles/models.yaml``: real models with sizes, hashes, sources
  and the architecture numbers needed to estimate memory before a download.
- :mod:`hearth.models.store` is the folder under ``<state>/models``: list, import, remove, resolve.
- :mod:`hearth.models.download` fetches a file with HTTP Range resume and sha256 verification.
"""
