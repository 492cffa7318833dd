"""Loading the network in 4/8 bits and writing pre-quantized checkpoints."""
