"""Engines: the classical baselines (no weights), the learned LPFM model, and an identity engine for tests.

``get_engine(name, **options)`` is the one entry point; importing this package imports no torch.
"""

from __future__ import annotations

import logging
from typing import Any

from lpfm_toolkit.engine.base import Engine, EngineOutput, IdentityEngine
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.prompts import Task

log = logging.getLogger(__name__)

ENGINES = ("auto", "lpfm", "classical", "identity")


def default_engine_name(task: Task | None = None, channels: int | None = None) -> str:
    """``lpfm`` when the shipped default bundle is installed (and, given ``task``, was trained for it, on
    inputs of ``channels`` channels when given), else ``classical``. Decided from the bundle's
    ``model_index.json`` and component configs: no model is loaded."""
    try:
        from lpfm_toolkit.engine.lpfm import default_bundle_available
    except ImportError:
        return "classical"
    if not default_bundle_available():
        return "classical"
    if task is not None:
        from lpfm_toolkit.engine.bundle import trained_for

        if not trained_for(task, channels=channels):
            log.info("the default bundle was not trained for %s: the classical engine runs it", task.label)
            return "classical"
    return "lpfm"


def get_engine(
    name: str = "auto",
    *,
    method: str | None = None,
    model: str | None = None,
    device: str | None = None,
    steps: int | None = None,
    samples: int = 1,
    trust_pickle: bool = False,
    tta: bool = False,
    task: Task | None = None,
    sampler: str | None = None,
    threads: int | None = None,
    compile: bool = False,
) -> Engine:
    """An engine by name. ``auto`` means the learned model when ``model`` is given or the default bundle is
    there and (given ``task``) was trained for that task; otherwise the classical engine."""
    if name == "auto":
        name = "lpfm" if model else default_engine_name(task)
    if name == "classical":
        from lpfm_toolkit.engine.classical import ClassicalEngine

        return ClassicalEngine(method=method)
    if name == "identity":
        return IdentityEngine()
    if name == "lpfm":
        try:
            from lpfm_toolkit.engine.lpfm import LpfmEngine
        except ImportError as exc:
            from lpfm_toolkit.errors import MissingDependencyError

            raise MissingDependencyError(
                f"the lpfm engine could not be loaded ({exc})", "install torch and diffusers, or use --engine classical"
            ) from exc
        return LpfmEngine.from_options(
            model=model,
            device=device,
            steps=steps,
            samples=samples,
            trust_pickle=trust_pickle,
            tta=tta,
            sampler=sampler,
            threads=threads,
            compile=compile,
        )
    raise ConfigError(f"unknown engine {name!r}", f"use one of {', '.join(ENGINES)}")


def engine_options_summary(engine: Engine) -> dict[str, Any]:
    return engine.describe()


__all__ = ["Engine", "EngineOutput", "IdentityEngine", "get_engine", "default_engine_name", "ENGINES"]


def engine_from_description(desc: dict[str, Any]) -> Engine:
    """Rebuild the engine recorded in a provenance record (for ``lpfm reproduce``): the classical engine with its
    recorded parameters, any other from :meth:`~lpfm_toolkit.options.EngineOptions.from_provenance`."""
    name = desc.get("name")
    if name == "classical":
        from lpfm_toolkit.engine.classical import ClassicalEngine

        method = desc.get("method")
        return ClassicalEngine(
            method=None if method in (None, "default") else method,
            psf_sigma=desc.get("psf_sigma", 1.5),
            rl_iterations=desc.get("rl_iterations", 20),
            wiener_balance=desc.get("wiener_balance", 0.05),
        )
    from lpfm_toolkit.options import EngineOptions, build_engine  # the options the record holds (or implies)

    return build_engine(EngineOptions.from_provenance(desc))
