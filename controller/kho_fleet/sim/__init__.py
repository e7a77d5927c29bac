"""The digital twin: simulated KHO/LUO hosts that write the kernel's real structures."""
