"""fastgpt: train a ChatGPT-style assistant on one GPU."""
__version__ = "0.1.0"
