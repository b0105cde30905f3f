"""What a model is on disk and whether it fits: local files and the Hugging Face cache,
the GGUF header (read in a child process), VRAM estimates and the VRAM gate
(admission.py), the GPUs.

May import the foundation (the top-level modules) only; never aiohttp's server.
"""
