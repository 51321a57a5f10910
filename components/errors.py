"""The one error type a user sees: a problem and its fix, in one line."""


class UnpoisonError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line and exits 2.

    Write the message as "<what is wrong>; <how to fix it>", e.g.
    "unknown attack 'badnet'; choose one of: badnets, blend, sig, wanet".
    """
