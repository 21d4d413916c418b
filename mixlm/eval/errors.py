"""The one error of `mixlm eval`: raised where an evaluation cannot run, caught by the command."""


class EvalError(RuntimeError):
    """An evaluation cannot run; the message says which model, task or file and what to do."""
