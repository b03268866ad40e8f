"""User-facing errors: entry points print these as one clear message, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, unknown name)."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message lists the valid choices."""


class DataError(UserError):
    """A dataset that is missing, empty or unreadable; the message says how to get it."""


class CheckpointError(UserError):
    """A file that is not a checkpoint of this project, or one it cannot read."""


class CheckpointDirError(UserError):
    """Checkpoints cannot be written where the run would write them."""
