"""Errors a user can cause. The CLI prints them as one line, never with a traceback."""


class LlmpackError(Exception):
    """A user-facing problem: bad input, bad options, a file we cannot read."""


class FormatError(LlmpackError):
    """The file is not a valid llmpack file (corrupt, truncated, too new, not ours)."""
