"""What every stage needs and none owns: tensor specs, io maps, golden sets, tolerances, the
target registry, paths, hashing, the cache, package versions and the torch / Keras / ONNX io
helpers. Imports nothing of the package but ``errors`` and ``_version``."""
