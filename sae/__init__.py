"""Shared code of the SAE pipeline: configuration, activation files, the language model, SAEs."""
