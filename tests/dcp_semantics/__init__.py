"""PyTorch's own DCP test scenarios, rewired to kvckpt: the behaviour users rely on with DCP's stock
FileSystemWriter/Reader, run against kvckpt on real servers and compared with a DCP folder."""
