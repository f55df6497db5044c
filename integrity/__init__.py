"""Nothing silently wrong: checksums of what clinfuse writes, one writer per output, and
``clinfuse verify``.

``checksums``: sha256 files in ``sha256sum`` format, Parquet written with page
checksums and read back verified. ``locks``: the exclusive lock an output directory's
writer holds. ``verify``: what is intact in a run directory, a model artifact or a
score output.
"""
