"""`python -m kho_agent` (and the kho-agent.pyz zipapp) run the agent CLI."""

import sys

from .cli import main

sys.exit(main())
