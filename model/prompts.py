"""Prompts for the three-turn conversation, with the variants a study can get.

The defaults are the reference's own strings (docs/model.md, "Prompt and chat template"): the system prompt and report prompt
of ``write_radiologic_report``, the question of ``write_differential_diagnosis`` as the second
turn, and the README's multi-turn follow-up "Should additional radiologic study needed?" (sic)
as the third. The image is sent once, in the first user message; follow-ups are plain text.

Two variants are ours and are recorded in ``ModelResult.prompts`` so a reader knows which text
the model saw:

* ``paediatric``: for patients under 18 a caution about the large-looking paediatric heart is
  appended to the report prompt (the paper's v1 work used such a warning against false
  cardiomegaly; its wording is not public, this one is ours);
* ``confirmation``: optional yes/no follow-up turns for findings the report leaves uncertain or
  unmentioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.chat import IMAGE_TOKEN

SYSTEM = (
    "You are a helpful radiologist. Try to interpret chest x ray image and answer to the "
    "question that user provides."
)
REPORT = (
    "Write a radiologic report on the given chest radiograph, including information about "
    "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
    "pneumothorax.\n"
)
DIFFERENTIAL = "What are the possible differential diagnoses for this patient?\n"
RECOMMENDATION = "Should additional radiologic study needed?"
PAEDIATRIC_CAUTION = (
    "This is a paediatric patient: on paediatric chest radiographs the heart can look large "
    "(thymus, AP projection, shallow inspiration), so do not call cardiomegaly from apparent "
    "heart size alone."
)
CONFIRMATION = "Is there {finding} on this chest radiograph? Answer yes or no."

# How each labeler finding is named in a confirmation question.
FINDING_PHRASES: dict[str, str] = {
    "atelectasis": "atelectasis",
    "cardiomegaly": "cardiomegaly",
    "consolidation": "consolidation",
    "edema": "pulmonary edema",
    "pleural_effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "pneumonia": "pneumonia",
    "lung_opacity": "a lung opacity",
}


@dataclass(frozen=True)
class PromptConfig:
    """Every prompt the engine sends, and the switches for the optional variants.

    Attributes
    ----------
    paediatric_age:
        Patients younger than this (years) get ``paediatric_caution``; ``None`` turns the
        age-aware prompt off.
    confirm_findings:
        Ask ``confirmation`` for each finding the report leaves uncertain or unmentioned
        (off by default: it costs one short turn per finding).
    """

    system: str = SYSTEM
    report: str = REPORT
    differential: str = DIFFERENTIAL
    recommendation: str = RECOMMENDATION
    paediatric_caution: str = PAEDIATRIC_CAUTION
    paediatric_age: float | None = 18.0
    confirmation: str = CONFIRMATION
    confirm_findings: bool = False
    confirmation_max_new_tokens: int = 8
    finding_phrases: dict[str, str] = field(default_factory=lambda: dict(FINDING_PHRASES))

    def report_message(self, age_years: float | None) -> tuple[str, str]:
        """(first user message with the image, variant name) for a patient of this age."""
        text = self.report
        variant = "default" if text == REPORT else "custom"
        if (
            self.paediatric_age is not None
            and age_years is not None
            and age_years < self.paediatric_age
        ):
            text = text.rstrip() + " " + self.paediatric_caution
            variant = "paediatric"
        return IMAGE_TOKEN + "\n" + text, variant

    def variants(self) -> dict[str, str]:
        """Names of the follow-up prompts in use: "default" or "custom"."""
        return {
            "differential": "default" if self.differential == DIFFERENTIAL else "custom",
            "recommendation": "default" if self.recommendation == RECOMMENDATION else "custom",
            "system": "default" if self.system == SYSTEM else "custom",
            "confirmation": "on" if self.confirm_findings else "off",
        }

    def confirmation_question(self, finding: str) -> str:
        return self.confirmation.format(finding=self.finding_phrases.get(finding, finding))
