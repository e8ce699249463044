"""Pure-PyTorch numerics of the three papers: the oracle every kernel and codec is tested against."""
