"""What can go wrong with a data set, in the user's terms: every error is a `UserError` (one line, exit status 2).

The loader is called by command-line applications, so its messages name what a user sets, not function
arguments. Each setting of the loader (`data_dir`, `cache_dir`, `download`, ...) has a `Setting`: the CLI flag,
the config key and the environment variable that set it. `SETTINGS` holds the spelling of `python -m experiments
reproduce` (flags ``--data-dir``/``--cache-dir``, keys ``data.*``); an application that spells them otherwise (the
sweep's ``datasets[i].data_dir``) passes its own to `load_dataset(..., settings=...)` / `preprocess`.

Every error carries, besides its message:

* ``dataset`` -- the data set's name (None where it is not known);
* ``setting`` -- the loader setting the user should change (a key of `SETTINGS`), or None when a file is to
  blame (a checksum mismatch, a malformed file) or the network is;
* ``path`` -- the offending file or directory, where there is one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experiments.common.cli import UserError

__all__ = [
    "ChecksumError",
    "DataSettingError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetWarning",
    "SETTINGS",
    "Setting",
]


@dataclass(frozen=True)
class Setting:
    """How a user sets one loader setting: a CLI flag, a config key, an environment variable (any may be None)."""

    flag: str | None = None
    key: str | None = None
    env: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.flag, self.key and f"config key {self.key}", self.env and f"${self.env}") if p]
        if not parts:
            return "(not settable)"
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


#: The settings as `python -m experiments reproduce` spells them (flags, ``data.*`` config keys, environment).
SETTINGS: dict[str, Setting] = {
    "data_dir": Setting(flag="--data-dir", key="data.data_dir"),
    "cache_dir": Setting(flag="--cache-dir", key="data.cache_dir", env="DEQ_JAX_DATA_DIR"),
    "download": Setting(key="data.download"),
    "base_url": Setting(env="DEQ_JAX_DATA_BASE_URL"),
    "n_train": Setting(key="data.n_train"),
    "n_test": Setting(key="data.n_test"),
    "features": Setting(key="data.features"),
    "pca_dim": Setting(key="data.pca_dim"),
}

SettingsArg = Mapping[str, Setting | str] | None


def resolve_settings(overrides: SettingsArg) -> dict[str, Setting]:
    """`SETTINGS` with a caller's spellings; a plain string is taken as a config key."""
    out = dict(SETTINGS)
    if overrides is None:
        return out
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"argument 'settings' must be a mapping from setting name to Setting; received {type(overrides).__name__}"
        )
    for name, given in overrides.items():
        if name not in SETTINGS:
            raise ValueError(f"argument 'settings' has an unknown setting {name!r}; known: {sorted(SETTINGS)}")
        value = Setting(key=given) if isinstance(given, str) else given
        if not isinstance(value, Setting):
            raise ValueError(
                f"argument 'settings'[{name!r}] must be a Setting or a config key string; received {value!r}"
            )
        out[name] = value
    return out


class DatasetError(UserError):
    """Base of every data set error (a `UserError`: the CLIs print its message and exit with status 2)."""

    def __init__(
        self, message: str, *, dataset: str | None = None, setting: str | None = None, path: pathlib.Path | None = None
    ):
        super().__init__(message)
        self.dataset = dataset
        self.setting = setting
        self.path = path


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data set's files are not on disk and could not be downloaded (or ``data_dir`` does not exist).

    ``missing``: the standard file names not found; ``searched``: the directories looked in. ``setting`` is
    ``"data_dir"`` when the given data directory does not exist, ``"download"`` when files are missing and
    downloading is disabled, None when a download failed (the message gives the URL and the reason)."""

    def __init__(self, message: str, *, missing: Sequence[str] = (), searched: Sequence[pathlib.Path] = (), **kwargs):
        super().__init__(message, **kwargs)
        self.missing = tuple(missing)
        self.searched = tuple(searched)

    def __str__(self) -> str:  # FileNotFoundError would format its errno fields instead of the message
        return str(self.args[0]) if self.args else ""


class ChecksumError(DatasetError):
    """A data file is not the published file: its digest (or, where no digest is published, its structure)
    does not match. ``verified_by``: what was compared, in words ("MD5 of the file", "MD5 of the decompressed
    content", "SHA-256 of the decompressed content" or "structure"); ``expected``/``got``: the digests compared
    (hex), or for "structure" the expected and the found shape in words."""

    def __init__(
        self, message: str, *, expected: str | None = None, got: str | None = None, verified_by: str = "", **kwargs
    ):
        super().__init__(message, **kwargs)
        self.expected = expected
        self.got = got
        self.verified_by = verified_by


class DatasetFormatError(DatasetError, ValueError):
    """A data file passed its checksum (or none was known) but is not in the expected format."""


class DataSettingError(DatasetError, ValueError):
    """A setting's value does not fit the data (``n_train`` above the split's size, ``pca_dim`` above the rank,
    a cache directory that cannot be written): ``setting`` names it."""


class DatasetWarning(RuntimeWarning):
    """A data file was accepted with less than a checksum (a structural check), or a corrupt cached file is being
    replaced by a fresh download."""
