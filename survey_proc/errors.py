"""User-facing errors.

Every error a user can cause derives from :class:`SurveyProcError`. Its message names what
was wrong, where (file, field, epoch, variable or column) and what to do. The CLI prints
these without a traceback and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class SurveyProcError(Exception):
    """Base class of errors caused by input, configuration or environment."""


class ConfigError(SurveyProcError, ValueError):
    """A scenario or run configuration value is invalid."""


class StoreError(SurveyProcError):
    """A survey store cannot be created, opened or written."""


class StoreValidationError(StoreError):
    """A survey store does not follow the format; ``problems`` lists every finding."""

    def __init__(self, path: str, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"survey store {self.path} is not valid ({len(problems)} problem(s)):\n{lines}")
