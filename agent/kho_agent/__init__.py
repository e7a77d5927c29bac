"""kho-agent: the on-host side of kho-fleet (stdlib only, runs on any python3 >= 3.9)."""

__version__ = "0.1.0"
