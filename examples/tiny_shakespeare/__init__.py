"""Tiny Shakespeare, character level: data, a nanoGPT-style model, sampling.

See README.md beside this file. The registry imports ``.data`` and ``.model``
through the names a config gives (``"examples.tiny_shakespeare.model:char_transformer"``).
"""
