"""The bottom layer: errors, the cache directory, atomic writes and hashing. Imports nothing of potstill."""
