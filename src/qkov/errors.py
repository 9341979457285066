"""The one exception type qkov raises for user mistakes.

Every message says what was given, what was expected and how to fix it, in one line; the CLI
prints it as ``qkov: <message>`` and exits with code 2.
"""


class QkovError(ValueError):
    """A user mistake: bad input, a bad config, a missing or damaged file."""
