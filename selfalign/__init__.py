"""selfalign: online preference alignment of language models (SELM, SAIL, and their baselines)."""

__version__ = "0.1.0"
