"""The one error type a user sees: a problem and its fix, in one line."""


class UnpoisonError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line and exits 2.

    Write the message as "<what is wrong>; <how to fix it>", e.g.
    "unknown attack 'badnet'; choose one of: badnets, blend, sig, wanet".

    In a KFP pipeline it does not fail its task (KFP would retry it): the task records it in USER_ERROR_FILE and
    the run's `track` task fails with USER_ERROR_EXIT (components/runner.py, `guarded`).
    """


USER_ERROR_EXIT = 3  # the exit code of a KFP run's `track` task when a stage stopped on an UnpoisonError
USER_ERROR_FILE = "user_error.json"  # {"stage", "error"} in the outputs of a task that stopped on one
