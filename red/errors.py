"""The errors a run stops on with a one-line message (exit status 2 from `python -m red.train`), importable by
any module without pulling in the config schema."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""
