"""Graph passes of lookupc (importable as ``lookupc.passes``).

One rewrite per file; each pass is a small callable over a model or GraphModule.
"""
