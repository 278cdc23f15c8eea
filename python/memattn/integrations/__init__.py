"""Integrations of memattn with other libraries.

- ``memattn.integrations.hf``: Hugging Face transformers, ``attn_implementation="memattn"``
  (imported on demand: importing it imports transformers).
"""
