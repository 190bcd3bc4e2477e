"""Healing by training: the compressed student learns to match the original (issue 9).

Phase 1 (blockwise.py, a step of the layer stream): each block, quantized and pruned as it
will be stored, is trained to reproduce the original block's output (teacher.py streams the
original alongside). Phase 2 (e2e.py, file to file): the scales and norms of the whole file
are trained against the original's next-token distribution. torch_block.py executes the
shared block description with autograd; fakequant.py trains on exactly the stored grid.
"""
