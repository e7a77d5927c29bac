"""The controller's exception root: every error kho-fleet means to report is a KhoFleetError.

`kho-fleet` main() catches KhoFleetError and prints its one line with `exit_code`: 2 for
bad input (InputError: a file, field, host or option the user handed us; nothing was
touched), 1 for work that ran and failed. Anything else that reaches main() is a bug,
reported as an internal error (exit 70). A few classes also keep a builtin base
(ValueError, RuntimeError) that existing callers catch.
"""

from __future__ import annotations

__all__ = ["KhoFleetError", "InputError", "Bug", "EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERNAL"]

EXIT_FAILED = 1          # the work ran and something failed (a host, a gate): see the report
EXIT_INPUT = 2           # bad input: nothing was started or touched
EXIT_INTERNAL = 70       # a bug in kho-fleet (sysexits EX_SOFTWARE): KHO_FLEET_DEBUG=1 for more


class KhoFleetError(Exception):
    """An error kho-fleet reports in one line; `exit_code` 1: the work ran and failed."""

    exit_code: int = EXIT_FAILED


class InputError(KhoFleetError):
    """Bad input: the message names the file and field, the host or the option (exit 2)."""

    exit_code = EXIT_INPUT


class Bug(KhoFleetError):
    """A broken invariant (e.g. an illegal state transition): reported as an internal error."""

    exit_code = EXIT_INTERNAL
