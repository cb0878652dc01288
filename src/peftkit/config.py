"""Adapter configurations: dataclasses that round-trip through ``adapter_config.json``.

A saved config is read forward- and backward-tolerantly: keys this version does not know (written by a
newer peftkit or by Hugging Face PEFT) warn and are ignored, missing keys take their defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import os
import warnings
from typing import Any, Callable, ClassVar

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """The task a wrapped model solves; selects the PeftModel subclass and default trainable heads."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")


# peft_type -> config class, for ``PeftConfig.from_dict`` on the base class. The registry (which imports this
# module, so it cannot be imported here) installs its lookup when it loads: ``set_config_lookup``.
_config_class_of: Callable[[str], type] | None = None


def set_config_lookup(lookup: Callable[[str], type]) -> None:
    """Install ``lookup(peft_type) -> config class`` (raising KeyError for an unknown type): the registry's."""
    global _config_class_of
    _config_class_of = lookup


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def non_finite(value: Any, where: str) -> tuple[str, Any] | None:
    """The first non-finite number in ``value`` (a number, or one inside lists, tuples, sets and dict values)
    as ``(path, number)``, the path written from ``where`` (``alpha_pattern['q_proj']``); None if all are finite.
    Configs of configs (composition blocks) are validated when they are built, so they are not entered."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):
        return None if math.isfinite(float(value)) else (where, value)
    if isinstance(value, dict):
        items: Any = ((f"{where}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, (set, frozenset)):
        items = ((f"{where}[...]", v) for v in value)
    else:
        return None
    for path, item in items:
        found = non_finite(item, path)
        if found:
            return found
    return None


@dataclasses.dataclass
class PeftConfig:
    """Fields shared by every method (names as in Hugging Face PEFT).

    Subclasses set the class attribute ``PEFT_TYPE`` (e.g. ``"LORA"``); it is written to the ``peft_type`` key.
    """

    PEFT_TYPE: ClassVar[str] = ""

    task_type: str | TaskType | None = None
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self._check_finite()
        if isinstance(self.peft_type, enum.Enum):  # peft's PeftType (a str enum): keep its value
            self.peft_type = self.peft_type.value
        if self.PEFT_TYPE or self.peft_type is None:  # a config class names its own type (peft overwrites too)
            self.peft_type = self.PEFT_TYPE
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ConfigError(
                    f"task_type: expected one of {[t.value for t in TaskType]}, got {self.task_type!r}"
                ) from None
        for f in dataclasses.fields(self):  # a sub-config given as a dataclass (peft's LoftQConfig) is stored
            value = getattr(self, f.name)  # as the plain dict of its fields, as peft does
            if f.default_factory is dict and dataclasses.is_dataclass(value) and not isinstance(value, type):
                setattr(self, f.name, dataclasses.asdict(value))
        for name in NAME_FIELDS:  # module-name fields: a collection of names becomes a set, as in peft
            value = getattr(self, name, None)  # (written to JSON as a sorted list)
            if isinstance(value, (list, set, tuple, frozenset)):
                setattr(self, name, set(value))
            elif not (value is None or isinstance(value, (str, list))):
                raise ConfigError(f"{type(self).__name__}.{name}: expected a list of names or a regex string, "
                                  f"got {value!r}")

    def _check_finite(self) -> None:
        """Every number of every field (also inside lists and dicts: ``rank_pattern``, ``alpha_pattern``) is
        finite: an infinite alpha or a NaN dropout would only show as NaN logits later."""
        for f in dataclasses.fields(self):
            found = non_finite(getattr(self, f.name), f.name)
            if found:
                err = ConfigError(f"{type(self).__name__}.{found[0]}: expected a finite number, got {found[1]!r}")
                err.field = f.name  # type: ignore[attr-defined]
                raise err

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: enums become strings, sets become sorted lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "PeftConfig":
        """Build a config from a dict; unknown keys warn (naming ``source``) and are dropped."""
        if cls is PeftConfig:
            peft_type = data.get("peft_type")
            if not peft_type:
                raise ConfigError(f"{source}: missing 'peft_type'; cannot tell which method the adapter uses")
            try:
                cls = _config_class_of(str(peft_type))
            except KeyError as err:
                raise ConfigError(f"{source}: peft_type {peft_type!r} is not a peftkit method ({err})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring keys unknown to {cls.__name__}: {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ConfigError as err:
            if source == "config" or str(err).startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {err}") from None

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(kwargs)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: adapter config not found (expected {CONFIG_NAME} in {path})")
        data = cls.from_json_file(file)
        data.update(kwargs)
        return cls.from_dict(data, source=file)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of a config file (as peft's ``from_json_file``); errors name the file."""
        file = os.fspath(path_json_file)
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
        if "runtime_config" in data:  # peft: runtime settings are never read from a file
            warnings.warn(f"{file}: ignoring the runtime_config key (runtime settings are not saved)", stacklevel=2)
            del data["runtime_config"]
        return data

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def _check(self, ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{field}: expected {expected}, got {getattr(self, field)!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


# -- field checks the methods' configs share ------------------------------------------------------------------
# Each raises ConfigError "<Config>.<field>: expected <what>, got <value>" (``PeftConfig._check``). Bools are
# never numbers here: a JSON ``true`` in a hand-edited file must not become 1.
def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (finiteness is checked for every field by ``PeftConfig``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(config: PeftConfig, field: str, minimum: int | None = None, *, optional: bool = False,
              expected: str | None = None) -> None:
    """``field`` is an integer ``>= minimum`` (any integer when None); ``optional``: None passes too."""
    value = getattr(config, field)
    if optional and value is None:
        return
    what = expected or ("an integer" if minimum is None else "an integer > 0" if minimum == 1
                        else f"an integer >= {minimum}")
    config._check(is_int(value) and (minimum is None or value >= minimum), field, what)


def check_number(config: PeftConfig, field: str, *, above: float | None = None, minimum: float | None = None,
                 expected: str | None = None) -> None:
    """``field`` is a number, ``> above`` and / or ``>= minimum`` when given."""
    value = getattr(config, field)
    ok = is_number(value) and (above is None or value > above) and (minimum is None or value >= minimum)
    what = expected or ("a number" + (f" > {above:g}" if above is not None else "")
                        + (f" >= {minimum:g}" if minimum is not None else ""))
    config._check(ok, field, what)


def check_probability(config: PeftConfig, field: str, *, closed: bool = False) -> None:
    """``field`` is a number in [0, 1) (a dropout, a decay), or in [0, 1] when ``closed``."""
    value = getattr(config, field)
    ok = is_number(value) and 0 <= value and (value <= 1 if closed else value < 1)
    config._check(ok, field, "a number in [0, 1]" if closed else "a number in [0, 1)")


def check_bool(config: PeftConfig, *fields: str) -> None:
    """Each of ``fields`` is True or False."""
    for field in fields:
        config._check(isinstance(getattr(config, field), bool), field, "True or False")


def check_pattern(config: PeftConfig, field: str, *, integer: bool) -> None:
    """Every value of the dict ``field`` (``rank_pattern``, ``alpha_pattern``: module regex -> value) is an integer
    > 0 (``integer``) or a number > 0."""
    for key, value in (getattr(config, field) or {}).items():
        if not ((is_int(value) if integer else is_number(value)) and value > 0):
            raise ConfigError(f"{type(config).__name__}.{field}[{key!r}]: expected "
                              f"{'an integer' if integer else 'a number'} > 0, got {value!r}")
