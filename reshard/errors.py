"""Exception types shared by `reshard` and `runtime`.

Library code raises these with a message that names the thing and the fix; only the
CLIs turn them into one `Error: ...` line and an exit code.
"""


class ReshardError(Exception):
    """Base class of every error this project raises on purpose.

    The message is worded for the Python API (`device="cpu"`); `cli`, when given, is the same
    message worded for the command line (`--device cpu`), which the CLIs print instead.
    """

    def __init__(self, *args, cli: str | None = None):
        super().__init__(*args)
        self.cli = cli


class SourceError(ReshardError):
    """The checkpoint to convert is missing, unreadable or not something we can convert."""


class HubUnreachableError(SourceError):
    """The hub could not be reached (network, HF_ENDPOINT) or is switched off (HF_HUB_OFFLINE)."""


class FormatError(ReshardError):
    """A converted folder does not match its manifest, or is not a converted folder at all."""


class CorruptFileError(FormatError):
    """One layer file is damaged; `path` names it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(
            f"{self.path}: {problem}; run `reshard convert` again to repair it"
        )


class UsageError(ReshardError):
    """A bad option value (unknown device, dtype, ...)."""


class DiskSpaceError(ReshardError):
    """Not enough free disk for what a command is about to write."""


class OutputInUseError(ReshardError):
    """The output folder holds something other than an earlier run of the same conversion."""


class MemoryBudgetError(ReshardError):
    """Even one streamed group next to the smallest job does not fit the device memory allowed."""
