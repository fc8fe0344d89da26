"""Compute kernels: pure-PyTorch references and fast paths, with speed gates that pick between them."""
