"""Encoders of the kernel's KHO/LUO structures: what a kernel writes, byte for byte.

The digital twin (kho_fleet.sim) and the tests use these to lay out real kernel data in
simulated memory; the agent itself only decodes (kho_agent.abi.*). So nothing here is
reachable from kho_agent.cli, and `kho-fleet build-agent` leaves this package out of the
zipapp. The ABI layouts (struct formats, constants) stay in the decoder modules; each
module here imports them from its decoder namesake.
"""
