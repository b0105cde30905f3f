"""Entry points that run inside worker subprocesses.

Each module here is executed by path with the worker's own interpreter, which needs its
model server package (llama_cpp, say) but not neuronctl; keep them free of neuronctl imports.
"""
