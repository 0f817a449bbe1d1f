"""The exceptions a user meets as one line (`error:` / `stopped:`), and how any exception is said in one."""


class UserError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2.

    The message names the file, key or row and, where there is one, the fix.
    """


class TrainingStopped(Exception):
    """A run stopped early (signal, non-finite loss, unreadable image); the message says why and
    what was kept. `exit_code` is what the CLI returns; `diverged` tells a non-finite loss (the
    recipe's values at fault, not the machine or the data) from the other stops."""

    def __init__(self, message: str, exit_code: int = 1, *, diverged: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.diverged = diverged


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (its whitespace collapsed), cut at `limit` characters;
    its type's name when it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
