"""Model bundles: a folder of components, each a ``config.json`` and ``.safetensors`` weights.

::

    lpfm-tiny/
      model_index.json      name, components, tasks, sampler defaults, sha256 of every file below
      MODEL_CARD.md         training data, recipe, metrics, the same sha256 values
      restorer/config.json  {"class": "Restorer", "config": {...}, "weights": "model.safetensors"}
      restorer/model.safetensors
      encoder/…  refiner/…

The bundle checksum (provenance, idempotency keys) is the sha256 of the canonical JSON of
``model_index.json``, which itself holds the sha256 of every config and weight file. Pickled
checkpoints (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) can run code when loaded: they are refused unless
the caller trusts them, and even then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import ModelError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "lpfm-bundle"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "bundles"
DEFAULT_BUNDLE = "lpfm-tiny"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
COMPONENT_NAMES = ("restorer", "encoder", "refiner", "stainer")
#: which roles a component class may fill (the stainer is a Restorer mapping fluorescence to H&E)
_ROLES = {"Restorer": ("restorer", "stainer"), "StainEncoder": ("encoder",), "Refiner": ("refiner",)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_checksum(index: dict[str, Any]) -> str:
    """The bundle checksum: sha256 of the canonical JSON of its index."""
    return hashlib.sha256(json.dumps(index, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _component_classes() -> dict[str, type]:
    from lpfm_toolkit.engine.models.encoder import StainEncoder
    from lpfm_toolkit.engine.models.refiner import Refiner
    from lpfm_toolkit.engine.models.restorer import Restorer

    return {"Restorer": Restorer, "StainEncoder": StainEncoder, "Refiner": Refiner}


# ------------------------------------------------------------------------------------------ components


def save_component(folder: str | Path, model: Any, dtype: str = "float32") -> dict[str, str]:
    """Write ``config.json`` and ``model.safetensors``; returns {file name: sha256}."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tensors = {
        k: v.detach().cpu().to(torch_dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(tensors, str(folder / "model.safetensors"))
    meta = {
        "class": type(model).__name__,
        "config": model.config.to_dict(),
        "weights": "model.safetensors",
        "dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {name: sha256_file(folder / name) for name in ("config.json", "model.safetensors")}


def read_weights(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Tensors of a weight file: safetensors always, pickles only when trusted (and weights-only)."""
    import torch

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise ModelError(f"cannot read weights {path}: {exc}", "the file is damaged; re-download it") from exc
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ModelError(
                f"refusing to load the pickled checkpoint {path.name}: pickles can run arbitrary code",
                "convert it to .safetensors, or pass --trust-pickle if you trust its origin",
            )
        log.warning("loading pickled weights %s (trusted by the user, weights_only=True)", path)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch's message advises retrying with weights_only=False, i.e. running the pickle's code: not ours
            raise ModelError(
                f"cannot load {path} with weights_only=True: {_pickle_reason(exc)}",
                "the checkpoint holds more than tensors; convert it to .safetensors",
            ) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"{path} does not hold a state dict")
        return state
    raise ModelError(f"unknown weight file type {path.name}", "use .safetensors")


def _pickle_reason(exc: BaseException) -> str:
    """What torch's weights-only error says the pickle holds, without its advice to trust it anyway."""
    import re

    text = str(exc)
    found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
    if found:
        return f"it holds a {found.group(1)} object, not only tensors"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return "it holds objects other than tensors" if "weights_only" in text or len(first) > 200 else first


def load_component(folder: str | Path, expected: str | None = None, trust_pickle: bool = False) -> Any:
    """Instantiate a component from its folder (``config.json`` + weights), in float32, eval mode."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} has no config.json", "a component folder holds config.json and weights")
    try:
        meta = json.loads(cfg_path.read_text())
        classes = _component_classes()
        cls = classes[meta["class"]]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelError(f"{cfg_path} is not a valid component config ({exc})") from exc
    if expected is not None and expected not in _ROLES.get(meta["class"], ()):
        raise ModelError(f"{folder} holds a {meta['class']}, expected the {expected}")
    weights = folder / meta.get("weights", "model.safetensors")
    if not weights.is_file():
        raise ModelError(f"weights {weights} are missing")
    state = read_weights(weights, trust_pickle)
    model = cls(**meta.get("config", {}))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ModelError(f"weights {weights} do not match {meta['class']} config: {str(exc)[:300]}") from exc
    return model.eval()


# --------------------------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    """A loaded bundle: its folder, index, checksum and instantiated components."""

    path: Path
    index: dict[str, Any]
    sha256: str
    components: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] | None = None  # the refiner's noise schedule; None: the built-in one

    @property
    def name(self) -> str:
        return str(self.index.get("name", self.path.name))

    @property
    def tasks(self) -> list[str]:
        return list(self.index.get("tasks", []))


def read_index(path: Path) -> dict[str, Any]:
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{path} is not a model bundle (no model_index.json)",
            f"shipped bundles: {', '.join(shipped_bundles()) or 'none'}; or give a bundle folder",
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_path} is not valid JSON ({exc})") from exc
    if index.get("format") != BUNDLE_FORMAT:
        raise ModelError(f"{index_path} is not an {BUNDLE_FORMAT} index (format={index.get('format')!r})")
    if int(index.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"{path} uses bundle format {index['format_version']}", "upgrade lpfm-toolkit to load it")
    return index


def stains_match(stains: dict[str, Any], source: str | None, target: str | None) -> bool:
    """Whether a bundle's ``stains`` entry (source: one stain or a list) covers ``source → target``."""
    sources = stains.get("source")
    sources = sources if isinstance(sources, list) else [sources]
    return source in sources and stains.get("target") == target


def trained_for(task: Any, model: str | Path | None = None, channels: int | None = None) -> bool:
    """Whether a bundle (default: the shipped default) was trained for ``task`` (and, given ``channels``, for
    inputs with that many channels), from its index and component configs alone: no torch, no weights.
    False when the bundle cannot be found or read."""
    from lpfm_toolkit.engine.taskcodes import TASK_NAMES, task_code

    try:
        path = resolve(model)
        index = read_index(path)
    except ModelError:
        return False
    if TASK_NAMES[task_code(task)] not in index.get("tasks", []):
        return False
    stains = index.get("stains")
    staining = getattr(task.kind, "value", None) == "virtual_stain"
    if (
        staining
        and isinstance(stains, dict)
        and not stains_match(
            stains, getattr(task.source_stain, "value", None), getattr(task.target_stain, "value", None)
        )
    ):
        return False
    if channels is not None:
        components = index.get("components", {})
        role = "stainer" if staining and "stainer" in components else "restorer"
        try:
            meta = json.loads((path / components.get(role, role) / "config.json").read_text())
            return int(meta.get("config", {}).get("in_channels", 3)) == channels
        except (OSError, ValueError, TypeError):
            return True  # loading reports a damaged component with its own message
    return True


def shipped_bundles() -> list[str]:
    """Names of the bundles packaged with the toolkit."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "model_index.json").is_file())


def user_models_dir() -> Path:
    """Where a lab keeps its own bundles by name: ``$LPFM_MODELS_DIR``, else ``~/.local/share/lpfm/models``."""
    import os

    env = os.environ.get("LPFM_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lpfm" / "models"


def user_bundles() -> list[str]:
    """Names of the bundles in :func:`user_models_dir` (folders holding a ``model_index.json``)."""
    folder = user_models_dir()
    try:
        return sorted(p.name for p in folder.iterdir() if (p / "model_index.json").is_file())
    except OSError:
        return []


def resolve(model: str | Path | None) -> Path:
    """A bundle folder from a shipped name, a user bundle's name (:func:`user_models_dir`), a folder path, or
    ``None`` (the default bundle). Shipped names win over user bundles of the same name."""
    name = DEFAULT_BUNDLE if model is None else str(model)
    shipped = SHIPPED_DIR / name
    if "/" not in name and (shipped / "model_index.json").is_file():
        return shipped
    user = user_models_dir() / name
    if "/" not in name and name not in (".", "..") and (user / "model_index.json").is_file():
        return user
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix == ".safetensors":
            raise ModelError(
                f"{path} is a single weight file, not a bundle",
                "a bundle is a folder with model_index.json; see docs/engine.md",
            )
        raise ModelError(f"{path} is not a model bundle")
    raise ModelError(
        f"no model bundle named {name!r}",
        f"shipped bundles: {', '.join(shipped_bundles()) or 'none'}; user bundles in {user_models_dir()}: "
        f"{', '.join(user_bundles()) or 'none'}; or give a bundle folder",
    )


def verify(path: str | Path) -> list[str]:
    """Problems found in a bundle (empty when every file matches its recorded sha256)."""
    path = Path(path)
    index = read_index(path)
    problems = []
    files: dict[str, str] = index.get("files", {})
    if not files:
        problems.append("model_index.json lists no file checksums")
    for rel, expected in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(f) != expected:
            problems.append(f"{rel}: sha256 mismatch (file changed or damaged)")
    for comp, folder in index.get("components", {}).items():
        for f in sorted((path / folder).glob("*")):
            rel = f"{folder}/{f.name}"
            if f.is_file() and rel not in files:
                problems.append(f"{rel}: not covered by a checksum")
        if f"{folder}/config.json" not in files:
            problems.append(f"component {comp}: config.json not listed")
    card = path / "MODEL_CARD.md"
    if not card.is_file():
        problems.append("MODEL_CARD.md: missing")
    else:
        text = card.read_text()
        problems += [
            f"MODEL_CARD.md does not state the sha256 of {rel}"
            for rel, sha in sorted(files.items())
            if rel.endswith(".safetensors") and sha not in text
        ]
    return problems


def load_bundle(model: str | Path | None = None, trust_pickle: bool = False, check: bool = True) -> Bundle:
    """Resolve, verify checksums (``check``) and instantiate every component of a bundle."""
    path = resolve(model)
    index = read_index(path)
    if check:
        files: dict[str, str] = index.get("files", {})
        for rel, expected in files.items():
            f = path / rel
            if not f.is_file() or sha256_file(f) != expected:
                raise ModelError(
                    f"bundle {path.name}: {rel} is missing or does not match its sha256",
                    f"run 'lpfm models verify {path}' and restore the bundle",
                )
    bundle = Bundle(path=path, index=index, sha256=index_checksum(index))
    for role, folder in index.get("components", {}).items():
        if role not in COMPONENT_NAMES:
            raise ModelError(f"bundle {path.name}: unknown component {role!r}")
        bundle.components[role] = load_component(path / folder, role, trust_pickle)
    if "restorer" not in bundle.components:
        raise ModelError(f"bundle {path.name} has no restorer")
    bundle.scheduler_config = read_scheduler_config(path, index, check)
    return bundle


SCHEDULER_FILE = "scheduler/scheduler_config.json"


def read_scheduler_config(path: Path, index: dict[str, Any], check: bool = True) -> dict[str, Any] | None:
    """The refiner's noise schedule saved in the bundle (diffusers' ``scheduler_config.json``), or None for bundles
    written before it was saved (they keep the built-in schedule). With ``check`` it must be covered by a checksum."""
    f = path / SCHEDULER_FILE
    if not f.is_file():
        return None
    if check and SCHEDULER_FILE not in index.get("files", {}):
        raise ModelError(
            f"bundle {path.name}: {SCHEDULER_FILE} is not covered by a checksum",
            f"remove it or re-write the bundle's model_index.json ('lpfm models verify {path}')",
        )
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"bundle {path.name}: {SCHEDULER_FILE} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("num_train_timesteps"), int):
        raise ModelError(f"bundle {path.name}: {SCHEDULER_FILE} has no num_train_timesteps")
    return config


def write_bundle(
    out: str | Path,
    name: str,
    components: dict[str, Any],
    training: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    notes: str = "",
    dtype: str = "float16",
    default_steps: int = 0,
    default_sampler: str = "ddim",
    refine_steps: int = 4,
    tasks: list[str] | None = None,
    stains: dict[str, Any] | None = None,
) -> Path:
    """Write components, ``model_index.json`` (with checksums) and ``MODEL_CARD.md``."""
    from lpfm_toolkit import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for role, model in components.items():
        for fname, sha in save_component(out / role, model, dtype=dtype).items():
            files[f"{role}/{fname}"] = sha
    if "refiner" in components:  # the noise schedule the refiner was trained with, as diffusers saves it
        from lpfm_toolkit.engine.models.refiner import scheduler_config

        config = scheduler_config(int(components["refiner"].config.num_train_timesteps))
        (out / "scheduler").mkdir(exist_ok=True)
        (out / SCHEDULER_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files[SCHEDULER_FILE] = sha256_file(out / SCHEDULER_FILE)
    trained = tasks if tasks is not None else list((training or {}).get("task_weights", {}))
    index = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "toolkit_version": __version__,
        "components": {role: role for role in components},
        "tasks": trained,
        "default_steps": default_steps,
        "default_sampler": default_sampler,
        "refine_steps": refine_steps if "refiner" in components else 0,
        "files": files,
    }
    if stains:
        index["stains"] = stains  # virtual staining: {"source": "AF" or a list of stains, "target": "H&E"}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(index, components, training, timings, metrics, notes))
    return out


def model_card(
    index: dict[str, Any],
    components: dict[str, Any],
    training: dict[str, Any] | None,
    timings: dict[str, float] | None,
    metrics: dict[str, Any] | None,
    notes: str,
) -> str:
    """The Markdown model card: what it is, what it was trained on, how well it does, checksums."""
    lines = [f"# Model card: {index['name']}", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Components", "", "| component | class | parameters |", "|---|---|---|"]
    for role, model in components.items():
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"| {role} | {type(model).__name__} | {n:,} |")
    lines += [
        "",
        f"Tasks: {', '.join(index['tasks'])}. Default steps: {index['default_steps']} "
        f"(0 = restorer only); with `--samples K` > 1: {index.get('refine_steps', 0)} "
        f"{index['default_sampler']} steps.",
        "",
    ]
    if training:
        lines += ["## Training", "", "```json", json.dumps(training, indent=2), "```", ""]
    if timings:
        total = sum(timings.values())
        lines += [
            "Wall time per stage (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
            + f"; sum {total / 60:.1f} min.",
            "",
        ]
    if metrics:
        lines += ["## Metrics", "", str(metrics.get("markdown", "")).strip() or json.dumps(metrics, indent=2), ""]
    lines += ["## Checksums (sha256)", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {rel} | `{sha}` |" for rel, sha in sorted(index["files"].items())]
    lines += ["", f"Bundle checksum (sha256 of the canonical model_index.json): `{index_checksum(index)}`", ""]
    return "\n".join(lines)
