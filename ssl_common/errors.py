"""Error types the suite raises for bad input.

Every error carries a message that names the cause and the fix; the CLI prints the
message alone (no traceback) and exits with status 2.
"""

__all__ = ["BenchmarkError", "CheckpointError", "ConfigError", "DatasetCorruptError", "DatasetNotFoundError",
           "DivergedError", "RecordError", "RecordExistsError", "RunLockedError", "StorageError", "UnknownMethodError", "did_you_mean", "first_line"]


class BenchmarkError(Exception):
    """Base class: a problem the user can fix (bad config, missing data, ...)."""


class ConfigError(BenchmarkError, ValueError):
    """A suite/method config has an unknown key or a value of the wrong type or range."""


class DatasetNotFoundError(BenchmarkError, FileNotFoundError):
    """The dataset files are not where the loader looked."""


class DatasetCorruptError(BenchmarkError, ValueError):
    """A dataset file exists but is truncated, corrupted or holds no usable images."""


class UnknownMethodError(BenchmarkError, KeyError):
    """No method is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class RecordExistsError(BenchmarkError, FileExistsError):
    """A run record already exists and --force was not given."""


class RecordError(BenchmarkError, ValueError):
    """A run record is malformed or does not follow the schema."""


class CheckpointError(BenchmarkError, ValueError):
    """A checkpoint cannot be used (wrong method/suite, unsafe content, corrupted)."""


class DivergedError(BenchmarkError, FloatingPointError):
    """The training loss became NaN or infinite."""


class StorageError(BenchmarkError, OSError):
    """A record, model or checkpoint could not be written (disk full, no permission, ...)."""


class RunLockedError(BenchmarkError, RuntimeError):
    """Another process is training the same run (same work dir, suite, method, epochs, seed)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line `error:`; the exception's type where it has no
    message (an EOFError from an empty file has none)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def did_you_mean(name: str, choices) -> str:
    """ `; did you mean 'x'?` when `name` is a near miss of one of `choices` (difflib), else ''."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
