"""Readers of the real media the `real` benchmark is built from, one module per installed source.

Each reader lists what its package ships (paths, captions, transcripts, variants) and says what is missing;
none downloads anything. `common` holds what they share: the seeded split and writing media into the
benchmark's own folder.
"""
