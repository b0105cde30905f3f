"""neuronctl: a per-node supervisor for llama.cpp model servers."""

__version__ = "0.1.0"
