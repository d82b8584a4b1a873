"""The errors a person acting on them needs to tell apart. A leaf module: it imports nothing from sidscale,
so every layer can raise them. A ``ConfigError`` (and its subclasses) is phrased for the person who wrote
the configuration and names the file, key or value; the entry point prints it on every rank and exits 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with the run configuration, phrased for the person who wrote it."""


class TeacherDirError(ConfigError):
    """A teacher directory that is missing, incomplete or not what the config's ``teacher.kind`` says."""


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (exists without resume, damaged, locked...)."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a ``latest`` marker that cannot be trusted; names the files."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written completely (disk full, a rank's write failed)."""
