"""User-facing errors: one clear line, exit status 1, never a traceback.

Every error a user can cause (bad data, bad config key, missing checkpoint, impossible mesh)
is raised as an `AlignXError` (or subclass); `alignx_jax.cli.main` prints `alignx: error: <msg>`
on stderr and exits 1.
"""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 300) -> str:
    """Another library's exception as one line: its type and its message, whitespace collapsed (a bucket
    client's or pyarrow's message runs over several lines)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


class AlignXError(Exception):
    """An error the user can fix; its message is printed as a single line."""


class ConfigError(AlignXError):
    """A wrong, misspelt or inconsistent configuration key."""


class CheckpointError(AlignXError):
    """A missing or malformed checkpoint folder, or an unsupported architecture."""


class DataError(AlignXError):
    """A malformed data row or file. The message names the file, the 0-based row and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:  # `line`: the row's 1-based line in a JSONL file, where blank lines shift it
            where.append(f"row {row}" + (f" (line {line})" if line is not None and line != row + 1 else ""))
        if field is not None:
            where.append(f"field {field!r}")
        self.file, self.row, self.field, self.line, self.message = file, row, field, line, message
        super().__init__(": ".join([", ".join(where), message]) if where else message)

    def at(self, *, file: str | None, row: int | None) -> DataError:
        """This error named at `file`, row `row`: a row-level check that did not know where its row lives
        keeps its field and wording, as the callers that pass file and row word it."""
        return DataError(self.message, file=file, row=row, field=self.field, line=self.line)


class MeshError(ConfigError):
    """A mesh that does not fit the available devices."""
