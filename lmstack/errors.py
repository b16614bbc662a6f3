"""The errors lmstack raises for a user's mistake, all derived from `LmstackError`.

The CLI prints an `LmstackError` as one line (`lmstack VERB: error: MESSAGE`) and lets anything else
raise with its full traceback: a bug in lmstack must never look like a user mistake. So a message
here says what is wrong and where (the file and line, the config key, the tensor, the option) and,
where there is one, the fix.

Each kind also derives from the built-in exception a caller would expect (ValueError for bad values,
OSError for files that cannot be written), so `except ValueError` in user code keeps working.
"""

from __future__ import annotations


class LmstackError(Exception):
    """A user-facing error: the input, a file or an option is wrong, not lmstack."""


class ConfigError(LmstackError, ValueError):
    """A config value, key or command-line option is wrong; the message names it (and the file, when there is one)."""


class CheckpointError(LmstackError, ValueError):
    """A model or checkpoint directory is unusable; the message names the file and, where it applies, the tensor."""


class TokenizerError(LmstackError, ValueError):
    """A tokenizer directory or file is missing or malformed, or a training option is impossible."""


class ChatTemplateError(LmstackError, ValueError):
    """A chat template cannot be found, compiled or rendered for these messages."""


class DataError(LmstackError, ValueError):
    """Input data or prepared token shards are missing, malformed or inconsistent; the message names the file."""


class TrainingError(LmstackError, ValueError):
    """Training cannot go on (e.g. the loss stayed non-finite, or nothing is trainable)."""


class GenerationError(LmstackError, ValueError):
    """A generation request cannot be served as asked (prompt too long, options that do not combine, ...)."""


class DeviceError(LmstackError, ValueError):
    """The requested device or precision is not available on this machine."""


class OutputError(LmstackError, OSError):
    """An output cannot be written where the user asked (missing permission, not a directory, disk full)."""


class InputFileError(LmstackError, OSError):
    """An input file the user named cannot be read (missing, unreadable, not text)."""


__all__ = ["ChatTemplateError", "CheckpointError", "ConfigError", "DataError", "DeviceError", "GenerationError",
           "InputFileError", "LmstackError", "OutputError", "TokenizerError", "TrainingError"]
