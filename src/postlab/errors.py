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


def format_validation_error(err, prefix: str = "") -> str:
    """A pydantic ValidationError as postlab reports bad input: one line per field, dotted path first."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        lines.append(f"{where or '<root>'}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "invalid config:\n  " + "\n  ".join(lines)
