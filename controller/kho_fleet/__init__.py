"""kho-fleet: the controller that rolls kernels across a fleet with KHO/LUO live update."""

__version__ = "0.1.0"
