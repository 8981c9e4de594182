"""The HF model files copied into every export (package data; they import only torch and transformers)."""
