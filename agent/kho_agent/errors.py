"""The agent's exception root: every error the agent means to report is a KhoAgentError.

`kho-agent` main() catches KhoAgentError and prints its one line with its exit code:
2 for bad input (InputError: a file, field or option the user handed us), 1 for a step
that failed on this host. Anything else that reaches main() is a bug and is reported as
an internal error. Stdlib only, no imports from the rest of the agent (every module may
import this one).
"""

from __future__ import annotations

__all__ = ["KhoAgentError", "InputError", "one_line"]


def one_line(text: object) -> str:
    """`text` as a single line (messages may quote file contents with newlines)."""
    return " ".join(str(text).split("\n")).replace("\r", " ").strip()


class KhoAgentError(Exception):
    """An error the agent reports in one line; `exit_code` 1: a step failed on this host."""

    exit_code: int = 1

    def headline(self) -> str:
        """What `kho-agent: ` is followed by on stderr."""
        return f"error: {one_line(self)}"


class InputError(KhoAgentError):
    """Bad input (file, field, option, path): exit 2; the message names what was bad."""

    exit_code = 2
