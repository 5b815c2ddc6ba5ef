"""The one exception type a user sees: its message says what was wrong and what to do."""


class SmpoError(Exception):
    """Bad input or an unusable resource; the message is meant for the user, one line."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has
    none: what a one-line SmpoError quotes of a library's (often multi-line) error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
