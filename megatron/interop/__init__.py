"""Interoperability with Hugging Face transformers: config and tensor mapping, checkpoint conversion."""
