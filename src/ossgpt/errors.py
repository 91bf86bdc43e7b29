"""The one exception type users see: a problem with their input, told in one line.

Library code raises `UserError` for bad input (missing files, impossible configs, foreign checkpoints);
the CLI prints its message as `error: ...` and exits with status 2, with no traceback. Programming errors
stay ordinary exceptions, so bugs still show a traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do about it."""
