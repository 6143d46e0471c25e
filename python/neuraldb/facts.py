"""Facts to edit: ``Fact`` and loaders for JSONL, CounterFact (ROME and MEND formats) and ZsRE (MEND format)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt`` with "{}" where ``subject`` goes, completed by ``target_new``.

    ``target_true`` is the object the unedited model is expected to give; ``paraphrases`` and ``neighborhood``
    are evaluation prompts (full text, subject already filled in) for generalisation and specificity.

    Example::

        >>> f = Fact("Danielle Darrieux", "The mother tongue of {} is", "English", target_true="French")
        >>> f.text
        'The mother tongue of Danielle Darrieux is'
    """

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("subject", "prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Fact.{name} must be a non-empty string, got {value!r}")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"Fact.prompt must contain exactly one '{{}}' marking the subject, got {self.prompt!r}")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighborhood", tuple(self.neighborhood))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)
