"""Optional dependencies (setup.py extras): ``MissingExtra`` names the extra to install. The CLI
prints it as a user error (exit code 2, no traceback)."""


class MissingExtra(ImportError):
    """An optional dependency a feature needs is not installed; the message says what to install."""

    def __init__(self, feature: str, package: str, extra: str):
        super().__init__(f"{feature} needs {package}, an optional dependency of mtp: pip install \"mtp[{extra}]\"")
