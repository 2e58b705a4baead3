"""One set of engine options for every entry point: :class:`EngineOptions`.

``lpfm enhance``, ``lpfm qupath enhance``, ``lpfm omero enhance``, the OMERO.script and ``lpfm jobs`` all
make one :class:`EngineOptions` — defaults → settings file → ``LPFM_*`` environment → flags — and build their
engine from it with :func:`build_engine`. The same object is what a job spec stores (:meth:`EngineOptions.to_dict`)
and what ``reproduce`` rebuilds from a provenance record (:meth:`EngineOptions.from_provenance`).

Flag names and setting keys agree: the field ``sampler`` is ``--sampler`` on the command line, ``sampler`` in
the settings file's ``[engine]`` section and ``LPFM_SAMPLER`` in the environment. ``trust_pickle`` is the one
exception: a flag only (:data:`FLAG_ONLY`). Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lpfm_toolkit.errors import ConfigError

#: the engines :func:`lpfm_toolkit.engine.get_engine` knows
ENGINES = ("auto", "lpfm", "classical", "identity")
#: the diffusion samplers of the lpfm engine (``engine.models.refiner.SCHEDULERS``): DDIM, DPM-Solver++
SAMPLERS = ("ddim", "dpm")
#: options of the learned engine only: given explicitly with another engine they are refused, not ignored
LPFM_ONLY = ("model", "device", "steps", "sampler", "tta", "compile")
#: options taken from a flag (or a stored job spec) only, never from a settings file or the environment:
#: a file that anyone could have written must not switch on unpickling of weights
FLAG_ONLY = ("trust_pickle",)
#: ``name → (lowest, highest, fix)`` for integer options
_RANGES: dict[str, tuple[int, int, str]] = {
    "steps": (0, 1000, "use 0 (restorer only) up to 1000 diffusion steps"),
    "samples": (1, 64, "use 1 (no uncertainty map) up to 64 samples"),
    "threads": (1, 1024, "use 1 or more math threads, or leave it unset for the free cores"),
}
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d{1,3})?)")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def flag_name(name: str) -> str:
    """The command-line flag of option ``name``: ``trust_pickle`` → ``--trust-pickle``."""
    return "--" + name.replace("_", "-")


def _where(name: str, value: Any, origin: str) -> str:
    """How a value is named in an error, as :func:`lpfm_toolkit.config.check_value` does: ``--steps: steps='x'``
    for a flag, ``FILE: steps='x'`` or ``env:LPFM_STEPS: steps='x'`` otherwise."""
    shown = repr(value if not isinstance(value, str) else value[:40])
    shown = shown if len(shown) <= 44 else f"{shown[:40]}…"
    return f"{flag_name(name) if origin == 'flag' else origin}: {name}={shown}"


@dataclass(frozen=True)
class EngineOptions:
    """Which engine runs and how; frozen, hashable (equal options share one loaded engine).

    ``None`` means "the engine's own default": the bundle's steps and sampler, the best device, the free
    cores. ``origin[name]`` says where a value came from (``default``, a file path, ``env:LPFM_…``,
    ``flag``, ``job``, ``provenance``); it takes no part in equality.
    """

    engine: str = "auto"
    method: str | None = None
    model: str | None = None
    device: str | None = None
    steps: int | None = None
    samples: int = 1
    sampler: str | None = None
    tta: bool = False
    trust_pickle: bool = False
    threads: int | None = None
    compile: bool = False
    origin: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "origin":
                object.__setattr__(self, f.name, _typed(f.name, getattr(self, f.name), self.origin_of(f.name)))
        object.__setattr__(self, "origin", dict(self.origin))

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order (also the settings keys and, with dashes, the flags)."""
        return tuple(f.name for f in fields(cls) if f.name != "origin")

    @classmethod
    def from_settings(cls, settings: Any = None, **flags: Any) -> EngineOptions:
        """Defaults → settings file → ``LPFM_*`` environment (as resolved in ``settings``, its ``[engine]``
        section) → ``flags``.

        ``settings``: a :class:`lpfm_toolkit.config.Settings` (default: :func:`~lpfm_toolkit.config.load_settings`).
        ``flags`` that are ``None`` (or ``False`` for on/off flags) were not given.
        """
        if settings is None:
            from lpfm_toolkit.config import load_settings

            settings = load_settings()
        given = getattr(settings, "origin", {}) or {}
        names = [n for n in cls.names() if n not in FLAG_ONLY and n in given]
        values = {n: getattr(settings, n) for n in names}
        return cls(**values, origin={n: given[n] for n in names}).with_flags(**flags)

    def with_flags(self, **flags: Any) -> EngineOptions:
        """A copy with command-line values applied; ``None`` and ``False`` mean "not given"."""
        unknown = set(flags) - set(self.names())
        if unknown:
            raise ConfigError(
                f"unknown engine option {', '.join(sorted(unknown))}", f"known: {', '.join(self.names())}"
            )
        given = {k: v for k, v in flags.items() if v is not None and v is not False}
        return self.updated(given, "flag")

    def updated(self, values: Mapping[str, Any], origin: str) -> EngineOptions:
        """A copy with ``values`` set, each recorded as coming from ``origin``."""
        merged = {**self.origin, **{k: origin for k in values}}
        return dataclasses.replace(self, **values, origin=merged)

    def origin_of(self, name: str) -> str:
        return self.origin.get(name, "default")

    def explicit(self) -> frozenset[str]:
        """Options the user gave for this run (flags, or a stored job spec), as opposed to settings defaults."""
        return frozenset(k for k, v in self.origin.items() if v in ("flag", "job"))

    # --------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (for job specs and provenance); :meth:`from_dict` reads it back."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "job") -> EngineOptions:
        """Options from :meth:`to_dict` data (missing keys keep their defaults); unknown keys are refused."""
        unknown = set(data) - set(cls.names())
        if unknown:
            raise ConfigError(
                f"engine options with unknown keys {', '.join(sorted(unknown))}",
                "they were written by a newer lpfm-toolkit; upgrade it",
            )
        return cls(**dict(data), origin={k: origin for k in data})

    @classmethod
    def from_provenance(cls, record: Any, *, model: str | None = None, trust_pickle: bool = False) -> EngineOptions:
        """The options that made an output, from its provenance record (a ``Provenance`` or its ``engine`` dict).

        A record holding ``engine.options`` (:meth:`to_dict`) is read as is; older records are read from what
        the engine described: its name, classical method, bundle (its folder if recorded), sampler, steps,
        samples and test-time augmentation. ``model`` replaces the bundle (it has moved). The device and
        threads are not taken (a result is reproduced on whatever is here), nor ``trust_pickle``: only the
        caller's ``trust_pickle`` allows pickled weights.
        """
        desc = record.engine if hasattr(record, "engine") else record
        if not isinstance(desc, Mapping) or not desc.get("name"):
            raise ConfigError("the provenance record names no engine", "it was not written by lpfm-toolkit")
        if isinstance(desc.get("options"), Mapping):
            opts = cls.from_dict(desc["options"], origin="provenance")
            values: dict[str, Any] = {"device": None, "threads": None}
        else:
            name = str(desc["name"])
            if name not in ENGINES:
                raise ConfigError(
                    f"provenance names an unknown engine {name!r}",
                    "it was made by a newer or foreign tool; upgrade lpfm-toolkit",
                )
            steps = desc.get("steps")
            sampler = desc.get("sampler")
            values = {"engine": name}
            if name == "classical" and desc.get("method") not in (None, "default"):
                values["method"] = desc["method"]
            if name == "lpfm":
                values |= {
                    "model": desc.get("model_path") or desc.get("model"),
                    "steps": None if steps is None else int(steps),
                    "samples": int(desc.get("samples", 1)),
                    "sampler": sampler if steps and sampler not in (None, "none") else None,
                    "tta": bool(desc.get("tta", False)),
                }
            opts = cls()
        if model is not None:
            values["model"] = model
        values["trust_pickle"] = trust_pickle  # only the caller's flag, never a record (files can be edited)
        return opts.updated(values, "provenance")

    # -------------------------------------------------------------------------------------- checking

    def resolved(self, task: Any, channel_names: Sequence[str]) -> EngineOptions:
        """These options with ``auto`` resolved for ``task``, checked against it without loading a model.

        Refuses options the chosen engine would ignore when the user gave them (``--method`` with the lpfm
        engine, ``--sampler`` or ``--steps`` with a classical one, ``--samples`` > 1 with a deterministic
        one); values from a settings file meant for another engine are dropped instead.
        """
        from lpfm_toolkit.pipeline import preflight_engine

        explicit = self.explicit()
        name = preflight_engine(
            self.engine,
            task,
            channel_names,
            method=self.method,
            model=self.model,
            steps=self.steps,
            samples=self.samples,
            explicit=explicit & {"method", "steps", "samples"},
        )
        dropped: dict[str, Any] = {}
        if name != "classical":
            dropped["method"] = None
        if name != "lpfm":
            for opt in LPFM_ONLY:
                value = getattr(self, opt)
                if value in (None, False):
                    continue
                if opt in explicit and opt != "steps":  # preflight_engine has refused an explicit --steps
                    raise ConfigError(
                        f"{flag_name(opt)} is a setting of the lpfm engine, not of the {name} engine",
                        f"drop {flag_name(opt)}, or use --engine lpfm",
                    )
                dropped[opt] = None if opt not in ("tta", "compile") else False
        return dataclasses.replace(self, engine=name, **dropped, origin=dict(self.origin))

    def engine_kwargs(self) -> dict[str, Any]:
        """The keywords :func:`lpfm_toolkit.engine.get_engine` takes (every option but the engine's name)."""
        return {name: getattr(self, name) for name in self.names() if name != "engine"}

    def rows(self) -> list[tuple[str, str, str]]:
        """``(option, value, origin)`` for display."""
        return [(name, repr(getattr(self, name)), self.origin_of(name)) for name in self.names()]


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(EngineOptions) if f.name != "origin"}


def build_engine(options: EngineOptions, task: Any = None) -> Any:
    """The engine ``options`` describe (the learned model loads its weights here: check everything else first).

    The engine keeps the options it was built from (``engine.options``, ``auto`` resolved), and the pipeline
    records them in the provenance, from where :meth:`EngineOptions.from_provenance` reads them back.
    """
    from lpfm_toolkit.engine import get_engine

    engine = get_engine(options.engine, task=task, **options.engine_kwargs())
    engine.options = dataclasses.replace(options, engine=engine.name, origin=dict(options.origin))
    return engine


def _typed(name: str, value: Any, origin: str) -> Any:
    """``value`` converted to option ``name``'s type and checked; a :class:`ConfigError` naming where it came from."""
    where = _where(name, value, origin)
    if value is None:
        return _DEFAULTS[name]
    if name in ("tta", "trust_pickle", "compile"):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{where} is not on or off", "use true or false (1 or 0)")
    if name in _RANGES:
        lo, hi, fix = _RANGES[name]
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            number = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where} is not a whole number", fix) from None
        if not lo <= number <= hi:
            raise ConfigError(f"{where} is out of range ({lo}–{hi})", fix)
        return number
    text = str(value).strip()
    choices = _choices(name)
    if choices is not None and text not in choices:
        raise ConfigError(f"{where} is not one of {', '.join(choices)}", f"use one of {', '.join(choices)}")
    if name == "device" and not _DEVICE.fullmatch(text):
        raise ConfigError(f"{where} is not a device", "use cpu, cuda, cuda:N or mps")
    if not text:
        raise ConfigError(f"{where} is empty", f"give a value, or leave {name} out")
    return text


def _choices(name: str) -> Collection[str] | None:
    if name == "engine":
        return ENGINES
    if name == "sampler":
        return SAMPLERS
    if name == "method":
        from lpfm_toolkit.engine.classical import ALL_METHODS

        return ALL_METHODS
    return None
