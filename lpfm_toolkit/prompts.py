"""Free-text prompts → a small closed set of :class:`Task` s.

``parse_prompt("super-resolve x4")`` → ``Task(kind=TaskKind.SUPER_RESOLUTION, scale=4)``. LPFM's own
wording ("Restore the low-quality H&E pathology image") and short forms ("sr x2", "AF -> H&E") are
both understood. The raw prompt travels with the task into provenance.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from lpfm_toolkit.errors import PromptError


class TaskKind(str, enum.Enum):
    SUPER_RESOLUTION = "super_resolution"
    DEBLUR = "deblur"
    DENOISE = "denoise"
    RESTORE = "restore"  # mixed degradations (blur + noise + low resolution)
    VIRTUAL_STAIN = "virtual_stain"
    STAIN_NORMALIZE = "stain_normalize"


class Stain(str, enum.Enum):
    HE = "H&E"
    AF = "AF"  # label-free autofluorescence
    FLUORESCENCE = "fluorescence"  # two-channel nuclear + cytoplasm fluorescence (e.g. DAPI + eosin)
    PAS = "PAS"
    MT = "MT"  # Masson's trichrome
    PASM = "PASM"  # periodic acid–silver methenamine (Jones)


SUPPORTED_SCALES = (2, 4, 8)
#: longer prompts are refused: a task is a few words, and an error must not echo a pasted document
MAX_PROMPT = 500

# Longest aliases first so "hematoxylin and eosin" wins over "eosin".
_STAIN_ALIASES: list[tuple[str, Stain]] = sorted(
    [
        ("hematoxylin and eosin", Stain.HE),
        ("haematoxylin and eosin", Stain.HE),
        ("hematoxylin-eosin", Stain.HE),
        ("h&e", Stain.HE),
        ("h & e", Stain.HE),
        ("he", Stain.HE),
        ("hne", Stain.HE),
        ("autofluorescence", Stain.AF),
        ("auto-fluorescence", Stain.AF),
        ("af", Stain.AF),
        ("label-free", Stain.AF),
        ("fluorescence", Stain.FLUORESCENCE),
        ("fluorescent", Stain.FLUORESCENCE),
        ("IF", Stain.FLUORESCENCE),  # immunofluorescence: upper case only, never the word "if"
        ("dapi", Stain.FLUORESCENCE),
        ("periodic acid-schiff", Stain.PAS),
        ("periodic acid schiff", Stain.PAS),
        ("pas", Stain.PAS),
        ("masson's trichrome", Stain.MT),
        ("masson trichrome", Stain.MT),
        ("masson", Stain.MT),
        ("trichrome", Stain.MT),
        ("mt", Stain.MT),
        ("pasm", Stain.PASM),
        ("jones silver", Stain.PASM),
        ("jones", Stain.PASM),
        ("silver", Stain.PASM),
    ],
    key=lambda pair: -len(pair[0]),
)

EXAMPLES = (
    "super-resolve x4",
    "sr x2",
    "denoise",
    "deblur",
    "Restore the low-quality H&E pathology image",
    "Remove the noise inside the H&E pathology image",
    "Translate the autofluorescence image to hematoxylin and eosin stained image",
    "AF -> H&E",
    "H&E -> PAS",
    "normalize stain",
)


@dataclass(frozen=True)
class Task:
    """What to do to the pixels; ``prompt`` is the user's raw text, kept for provenance."""

    kind: TaskKind
    scale: int = 1
    source_stain: Stain | None = None
    target_stain: Stain | None = None
    prompt: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind is TaskKind.SUPER_RESOLUTION and self.scale not in SUPPORTED_SCALES:
            raise PromptError(
                f"scale {self.scale} is not supported",
                "use 2, 4 or 8, e.g. 'sr x4'",
            )
        if self.kind is not TaskKind.SUPER_RESOLUTION and self.scale != 1:
            raise PromptError(f"{self.kind.value} does not change the scale (got {self.scale})")

    @property
    def slug(self) -> str:
        """A short file-name-safe label: ``sr-x4``, ``denoise``, ``stain-af-he``."""
        if self.kind is TaskKind.SUPER_RESOLUTION:
            return f"sr-x{self.scale}"
        if self.kind is TaskKind.VIRTUAL_STAIN:
            src = _stain_slug(self.source_stain)
            return f"stain-{src}-{_stain_slug(self.target_stain)}"
        if self.kind is TaskKind.STAIN_NORMALIZE:
            return "stain-norm"
        return self.kind.value

    @property
    def label(self) -> str:
        """Human label used in names of QuPath entries and OMERO images: ``sr×4``, ``AF→H&E``."""
        if self.kind is TaskKind.SUPER_RESOLUTION:
            return f"sr×{self.scale}"
        if self.kind is TaskKind.VIRTUAL_STAIN:
            return f"{self.source_stain.value}→{self.target_stain.value}"  # type: ignore[union-attr]
        return self.kind.value.replace("_", " ")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "scale": self.scale,
            "source_stain": self.source_stain.value if self.source_stain else None,
            "target_stain": self.target_stain.value if self.target_stain else None,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(
            kind=TaskKind(data["kind"]),
            scale=int(data.get("scale", 1)),
            source_stain=Stain(data["source_stain"]) if data.get("source_stain") else None,
            target_stain=Stain(data["target_stain"]) if data.get("target_stain") else None,
            prompt=data.get("prompt", ""),
        )


def _stain_slug(stain: Stain | None) -> str:
    return {Stain.HE: "he"}.get(stain, stain.value.lower()) if stain else "unknown"  # type: ignore[arg-type]


def _find_stains(text: str, cased: str = "") -> list[tuple[int, Stain]]:
    """Stains mentioned in ``text`` (lower case) with their positions, left to right, without overlaps.

    Upper-case aliases (``IF``) are matched in ``cased``, the same text before lower-casing.
    """
    found: list[tuple[int, int, Stain]] = []
    taken = [False] * len(text)
    for alias, stain in _STAIN_ALIASES:
        where = text
        if alias.isupper():
            if len(cased) != len(text):
                continue
            where = cased
        pattern = r"(?<![A-Za-z0-9])" + re.escape(alias) + r"(?![A-Za-z0-9])"
        for m in re.finditer(pattern, where):
            if any(taken[m.start() : m.end()]):
                continue
            for i in range(m.start(), m.end()):
                taken[i] = True
            found.append((m.start(), m.end(), stain))
    return [(start, stain) for start, _, stain in sorted(found)]


_SCALE = re.compile(
    r"(?:[x×\*]\s*(\d+)(?![\d.])|(\d+)\s*[x×](?![a-z])|(\d+)\s*(?:times|fold|-fold)|"
    r"(?:by|factor(?: of)?|scale)\s+(?:a factor of\s+)?(\d+))"
)
_WORD_SCALES = {"two": 2, "double": 2, "four": 4, "quadruple": 4, "eight": 8, "three": 3}
_SR_WORDS = re.compile(
    r"super[- ]?resol|(?<![a-z])sr(?![a-z])|upscal|upsampl|up-sampl|resolution|magnif|zoom|enlarg|"
    r"(?<![a-z])isr(?![a-z])"
)
_DENOISE = re.compile(r"denois|noise|noisy|grain")
_DEBLUR = re.compile(r"deblur|blur|sharpen|out[- ]of[- ]focus|defocus|focus")
_RESTORE = re.compile(r"restor|low[- ]quality|enhanc|mixed|degrad|improve|clean")
_NORMALIZE = re.compile(r"normali[sz]|macenko|stain[- ]?norm")
_TRANSLATE = re.compile(r"->|→|=>|\bto\b|\binto\b|translat|transfer|convert|virtual")


def parse_prompt(prompt: str) -> Task:
    """Map a free-text prompt to a :class:`Task`; raise :class:`PromptError` listing what is understood."""
    raw = prompt
    cased = " ".join(prompt.replace("’", "'").split())
    text = cased.lower()
    if not text:
        raise PromptError("empty prompt", _understood())
    if len(text) > MAX_PROMPT:
        raise PromptError(
            f"prompt of {len(text)} characters ({_quote(raw)}) is too long to be a task",
            f"say what to do in a few words (at most {MAX_PROMPT} characters); {_understood()}",
        )

    stains = _find_stains(text, cased)
    distinct = []
    for _, stain in stains:
        if not distinct or distinct[-1] is not stain:
            distinct.append(stain)

    if _NORMALIZE.search(text) and not _SR_WORDS.search(text):
        return Task(TaskKind.STAIN_NORMALIZE, source_stain=Stain.HE, target_stain=Stain.HE, prompt=raw)

    if len(distinct) >= 2 and _TRANSLATE.search(text):
        source, target = distinct[0], distinct[-1]
        return Task(TaskKind.VIRTUAL_STAIN, source_stain=source, target_stain=target, prompt=raw)

    if _SR_WORDS.search(text):
        scale = _parse_scale(text)
        if scale is None:
            raise PromptError(
                f"super-resolution prompt without a scale: {_quote(raw)}",
                "say ×2, ×4 or ×8, e.g. 'sr x4' or 'super-resolve by 2'",
            )
        return Task(TaskKind.SUPER_RESOLUTION, scale=scale, prompt=raw)

    has_noise = bool(_DENOISE.search(text))
    has_blur = bool(_DEBLUR.search(text))
    if has_noise and has_blur:
        return Task(TaskKind.RESTORE, prompt=raw)
    if has_noise:
        return Task(TaskKind.DENOISE, prompt=raw)
    if has_blur:
        return Task(TaskKind.DEBLUR, prompt=raw)
    if _RESTORE.search(text):
        return Task(TaskKind.RESTORE, prompt=raw)
    if len(distinct) == 1 and _TRANSLATE.search(text):
        raise PromptError(
            f"virtual staining needs a source and a target stain: {_quote(raw)}",
            "e.g. 'AF -> H&E' or 'H&E -> PAS'",
        )
    raise PromptError(f"prompt not understood: {_quote(raw)}", _understood())


def _quote(raw: str, limit: int = 60) -> str:
    """The prompt as quoted in an error: at most ``limit`` characters, one line."""
    one = " ".join(raw.split())
    return repr(one if len(one) <= limit else one[: limit - 1] + "…")


def _parse_scale(text: str) -> int | None:
    for m in _SCALE.finditer(text):
        value = next(g for g in m.groups() if g)
        return int(value)
    for word, value in _WORD_SCALES.items():
        if re.search(rf"(?<![a-z]){word}(?![a-z])", text):
            return value
    return None


def _understood() -> str:
    kinds = "super-resolution ×2/×4/×8, deblur, denoise, restore (mixed), virtual staining, stain normalisation"
    return f"understood: {kinds}; examples: " + "; ".join(repr(e) for e in EXAMPLES)
