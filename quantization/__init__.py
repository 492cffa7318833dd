"""Loading the network in 4/8 bits and writing pre-quantized checkpoints.

    schemes.py       what nf4 / int8 mean on each device, the recorded settings, library checks
    linears.py       one Linear: its stored quantized form, and the modules that run it
    swap.py          walking the network's named_children to swap nn.Linear modules
    prequantized.py  `diffucode quantize`'s streaming writer, and the loader of its output
    memory.py        weight bytes per dtype and device memory, for `status` and reports
    accuracy.py      quantized against full-precision logits on fixed inputs

The network module (daemon/network.py) knows nothing of this package; the checkpoint loader
calls into it when asked to quantize or when a directory is pre-quantized.
"""
