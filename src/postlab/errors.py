"""The errors postlab raises on purpose. Each names the file, line or field at fault and what to do."""


class PostlabError(Exception):
    """Base class: anything the user can fix. The CLI prints these without a traceback."""


class ConfigError(PostlabError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(PostlabError):
    """A data file is missing, empty or malformed."""


class ModelError(PostlabError):
    """A model or checkpoint cannot be found or loaded."""


class TrainingError(PostlabError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""
