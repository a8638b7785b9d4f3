"""postlab: post-training small language models and studying the recipes."""
__version__ = "0.1.5"
