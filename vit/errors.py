"""The one exception type the command line shows as a single line instead of a traceback."""


class ConfigError(ValueError):
    """Bad user input (a config value, a path, a checkpoint); the message names the fix."""
