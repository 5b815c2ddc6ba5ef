"""The one exception type a user sees: its message says what was wrong and what to do."""


class SmpoError(Exception):
    """Bad input or an unusable resource; the message is meant for the user, one line."""
