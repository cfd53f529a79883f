"""Rule-based finding labeler for chest radiograph report text, in the style of the CheXpert labeler.

The paper scores CXR-LLaVA by running the Stanford CheXpert labeler over generated and reference
reports. That labeler needs Java, NLTK data and a constituency parser; the node cannot ship it.
This module gives the same kind of answer in-process, from plain Python and regular expressions.
It is also the instrument that measures agreement between the model and radiologists, so its
policies are calibrated on how human coders label real radiology reports (a labelled collection
of radiologist-written reports; see ``docs/labeler.md`` and ``bench/labeler.py``) where that
differs from CheXpert:

1. **Sections.** Text under history-like headers (INDICATION, HISTORY, COMPARISON, TECHNIQUE, ...)
   describes the question, not the image, and is dropped. FINDINGS and IMPRESSION are kept.
2. **Sentences and clauses.** Sentences split on full stops and on line breaks that start a new
   line of thought. Clauses end at ``;``, ``but``, ``however``, ``although``, ``though``,
   ``whereas``, ``except``, ``other than`` ...; a comma or ``and`` also ends a clause when what
   follows is a clause of its own (it starts with ``there``/``the``/``it``, has its own finite
   verb, or opens with a new cue or - outside an ``or``-list - a positive modifier such as
   ``mild``, ``small``, ``left``). "with" after "compatible"/"consistent"/"associated" joins,
   it does not separate.
3. **Mentions.** Curated phrase lists per observation (CheXpert's vocabulary, extended), plus a
   small parser for statements about heart size ("heart size is normal" is a negative mention of
   cardiomegaly, "top-normal heart size" an uncertain one).
4. **Cues with scopes.** Negation cues ("no", "without", "free of", "negative for", "resolved",
   "is not seen", "has resolved", "are absent", "is excluded", "... within normal limits"),
   uncertainty cues ("may", "possible", "suggestive of", "concerning for", "cannot be excluded",
   "rather than", "correlate clinically for", "to rule out", "in the appropriate clinical
   setting" ...), historical cues ("history of", "chest tube for"), confident hedges that keep a
   finding present ("probable", "likely", "most suggestive of", "favored") and pseudo-cues that
   look like negation but are not ("no change in", "no increase in", "not resolved", "partially
   resolved"). A pre-cue covers what follows it to the end of its clause ("differential includes
   A, B and C" covers the whole list); a post-cue covers the noun phrases before it back to the
   previous clause, crossing a bare comma only inside a coordinated list ("effusion,
   consolidation and pneumothorax are not seen" vs "atelectasis, pneumonia not excluded").
   Hedges such as "possible" look forward when a mention follows and back only when used
   predicatively ("pneumonia is possible"), so "possible scarring" or "opacity may be due to
   scarring" leave the opacity certain. Double negation ("cannot be excluded", "not ruled out")
   is uncertainty. When both a negation and an uncertainty cue cover a mention, negation wins
   ("no findings to suggest pneumonia" is negative), as in NegBio.
5. **Aggregation** over mentions, as CheXpert does: any positive -> 1, else any uncertain -> -1,
   else any negative -> 0, else not mentioned (``None``).

Choices, where radiology language or CheXpert leaves room (each chosen for human-label agreement):

- **Alternatives are present.** Findings joined by ``or`` / ``versus`` / ``vs`` / ``and/or`` /
  ``/`` ("atelectasis or pneumonia", "effusion versus pleural thickening") are each labelled
  present (1), as coders of real reports code every named alternative; CheXpert makes them
  uncertain. A cue still decides: "no atelectasis or pneumonia" is negative, "may represent
  atelectasis or pneumonia" and "atelectasis or pneumonia cannot be excluded" are uncertain,
  "with or without pneumonia" is uncertain, and in "X rather than Y" Y is uncertain.
- **Hedges.** Confident hedges - "probable"/"probably", "likely"/"most likely", "presumed",
  "favored", "thought to represent", "most suggestive/consistent of" - keep a finding present.
  Weak hedges - "possible", "may", "could", "suggestive of", "suspicious for", "concerning for",
  "question of", "differential includes", "less likely", "cannot be excluded" - make it
  uncertain. "unlikely", "not likely" and "not suspected" are negative; "consistent with" and
  "compatible with" are positive.
- ``no_finding`` is 1 when nothing abnormal is positive or uncertain: neither our pathologies,
  nor CheXpert's enlarged cardiomediastinum, lung lesion, pleural other and fracture, nor any
  other abnormality (granulomas and calcifications, scars, emphysema/hyperinflation, low lung
  volumes, degenerative spine changes and scoliosis, tortuous or atherosclerotic aorta,
  elevated hemidiaphragm, hernias, blunted costophrenic angles, prominent interstitial markings,
  vascular congestion), nor support devices or the marks of surgery (tubes, lines, pacemakers,
  sternotomy wires, clips). That is a normal study as coders mean it; CheXpert ignores devices.
  It is ``None`` otherwise (never 0). One exception: a heart "at the upper limits of normal" is
  uncertain cardiomegaly but does not rule out no_finding. Blank or whitespace-only text gives
  ``None`` everywhere: an empty model output is a failure, not a normal study.
- **Edema** is the word edema in the lungs. Vascular congestion or engorgement, cephalization,
  Kerley lines, fluid overload and (congestive) heart failure are not edema (they still rule
  out ``no_finding``); "congestion without edema" is edema 0.
- **Pneumonia** is named: pneumonia, bronchopneumonia, pneumonitis. "infection"/"infectious
  process" alone is not pneumonia (it rules out ``no_finding``), and healed or granulomatous
  infection ("sequelae of prior granulomatous infection", "scar from old pneumonia") is a scar.
- **Pneumothorax** includes hydro-, hemo- and pyopneumothorax, "pleural air (collection)" and
  "air in the pleural space"; hydropneumothorax is also an effusion.
- **Pleural effusion** needs an effusion word (effusion, pleural fluid, hydrothorax, empyema):
  blunting of a costophrenic angle alone is not an effusion (coders code it as its own finding).
- "no large effusion" alone is negative (CheXpert); a positive mention elsewhere ("small left
  effusion") still wins through aggregation, and a negation never reaches back across a clause.
- Lung opacity is only labelled from opacity words (opacity, infiltrate, density, airspace
  disease, haziness, ground glass, interstitial or reticular *opacities*); consolidation, edema
  or pneumonia do not imply it. Prominent interstitial markings are not an opacity, nor is a
  density projecting over a rib, clavicle, nipple, breast or the chest wall.
- Heart size: "normal"/"unremarkable"/"within (normal) limits"/"not enlarged" -> cardiomegaly 0;
  "enlarged"/"large"/"increased"/"prominent" and **"borderline"** (borderline heart size,
  borderline cardiomegaly, borderline enlarged) -> 1, as coders count borderline as
  cardiomegaly; "top normal", "upper limits of normal" -> -1 (but ``no_finding`` may stay 1);
  "upper limits of normal or mildly enlarged" -> 1; "heart size is stable" alone says nothing
  -> ``None``. A normal *cardiomediastinal* silhouette also gives cardiomegaly 0; an enlarged one
  is enlarged cardiomediastinum, not cardiomegaly (CheXpert's hierarchy).
- "clear lungs" is not a mention of anything (as in CheXpert): it leaves every pathology
  ``None``; "clear" right before an opacity, effusion or pneumothorax word negates it (reports
  with a dropped "of").
- "unchanged", "stable", "improving", "decreased", "resolving", "partially resolved" keep a
  finding positive; "resolved", "cleared", "no longer seen", "removal of" make it negative.
- Unlike CheXpert, "CHF"/"heart failure" does not make cardiomegaly uncertain: human readers do
  not infer heart size from the words.
- "history of X", "treated for X" and "chest tube/drain for X" are not mentions of a current
  finding and are ignored.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from model.contracts import FINDINGS  # the one list of findings

__all__ = [
    "FINDINGS",
    "PATHOLOGIES",
    "STATE_NAMES",
    "Mention",
    "aggregate",
    "find_mentions",
    "label_report",
    "label_report_states",
    "split_sentences",
    "to_states",
]

PATHOLOGIES: tuple[str, ...] = FINDINGS[:-1]

# CheXpert observations that we do not return but that decide "no finding" the way CheXpert does.
_EXTRA: tuple[str, ...] = (
    "enlarged_cardiomediastinum",
    "lung_lesion",
    "pleural_other",
    "fracture",
    "other_abnormality",
    "support_devices",
)

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
STATE_NAMES: Mapping[int | None, str] = {
    POSITIVE: "present",
    NEGATIVE: "absent",
    UNCERTAIN: "uncertain",
    None: "not_mentioned",
}


@dataclass(frozen=True)
class Mention:
    """One mention of an observation in one sentence, after cues were applied.

    ``start``/``end`` are token indices (end exclusive) into the normalised sentence, which
    ``text`` quotes; ``label`` is 1, 0 or -1; ``cues`` quotes the cues that decided it.
    """

    finding: str
    sentence: int
    start: int
    end: int
    text: str
    label: int
    cues: tuple[str, ...] = ()


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --------------------------------------------------------------------------------------------
# Sections and sentences
# --------------------------------------------------------------------------------------------

_SKIPPED_HEADERS = (
    r"indications?|(?:brief |pertinent )?(?:clinical )?history|clinical (?:indications?|information|"
    r"data|details|notes?)|reasons? for (?:the )?(?:exam(?:ination)?|study|request|referral)|reason|"
    r"comparisons?|technique|procedure|exam(?:ination)?|type of (?:exam|examination|study)|"
    r"study|views?|history and indication"
)
_KEPT_HEADERS = (
    r"findings?|impressions?|conclusions?|opinion|summary|interpretation|results?|report|"
    r"final report|recommendations?|assessment|diagnosis|differential(?: diagnosis)?|"
    r"lungs?|heart|pleura|mediastinum|bones?"
)
_HEADER = re.compile(
    rf"(?:^|(?<=[\n.]))[ \t]*(?P<name>{_SKIPPED_HEADERS}|{_KEPT_HEADERS})[ \t]*:",
    re.IGNORECASE,
)
_SKIPPED_NAME = re.compile(rf"(?:{_SKIPPED_HEADERS})", re.IGNORECASE)
_ORGAN_HEADER = re.compile(r"lungs?|heart|pleura|mediastinum|bones?", re.IGNORECASE)


def _drop_history_sections(text: str) -> str:
    """Remove the bodies of INDICATION/HISTORY/COMPARISON/TECHNIQUE-like sections.

    A skipped section ends at the next header, at a blank line, at a line break that starts a
    new line of thought, or - in one-line text - at its first full stop.
    """
    out: list[str] = []
    pos = 0
    headers = list(_HEADER.finditer(text))
    for i, match in enumerate(headers):
        name = match.group("name")
        if _ORGAN_HEADER.fullmatch(name):
            # "Heart: normal size." - the organ name is part of the statement.
            continue
        out.append(text[pos : match.start()])
        pos = match.end()
        if not _SKIPPED_NAME.fullmatch(name):
            continue
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[pos:end]
        stop = re.search(r"\n[ \t]*\n|\n(?=[ \t]*[A-Z0-9\-*\u2022])", body)
        if stop is None and "\n" not in text:
            stop = re.search(r"[.!](?=\s)", body)
        pos = pos + stop.end() if stop is not None else end
    out.append(text[pos:])
    return "".join(out)


_ABBREVIATIONS = (
    (re.compile(r"\bvs\.(?=\s|$)", re.IGNORECASE), "versus"),
    (re.compile(r"\be\.g\.", re.IGNORECASE), "eg"),
    (re.compile(r"\bi\.e\.", re.IGNORECASE), "ie"),
    (re.compile(r"\b(?:approx|dr|no)\.(?=\s+\d)", re.IGNORECASE), "number"),
    (re.compile(r"\b(approx|approximately|cf|fig|st)\.", re.IGNORECASE), r"\1"),
)


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences, after dropping history-like sections.

    Line breaks end a sentence unless the next line continues it (starts in lower case), so
    that wrapped text ("no effusion or\\npneumothorax") keeps its negation scope.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _drop_history_sections(text)
    for pattern, replacement in _ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    # A line break followed by a lower-case word continues the sentence (wrapped text).
    text = re.sub(r"[ \t]*\n[ \t]*(?=[a-z(])", " ", text)
    sentences: list[str] = []
    for line in re.split(r"\n+", text):
        # Full stops end sentences unless they sit inside a number ("1.5 cm").
        for piece in re.split(r"(?<!\d)\.(?=\s|$)|(?<=\d)\.(?=\s+[A-Z])|!(?=\s|$)", line):
            piece = piece.strip(" \t-*\u2022")
            piece = re.sub(r"^\d{1,2}[.)]\s*", "", piece)  # list numbering "1." / "2)"
            if re.search(r"[A-Za-z]", piece):
                sentences.append(piece)
    return sentences


_CONTRACTIONS = (
    (re.compile(r"\bcan[’']t\b"), "cannot"),
    (re.compile(r"\bwon[’']t\b"), "will not"),
    (re.compile(r"\b(\w+)n[’']t\b"), r"\1 not"),
)
_SHORTHANDS = (
    (re.compile(r"\bw/o\b"), " without "),
    (re.compile(r"\bs/p\b"), " status post "),
    (re.compile(r"\br/o\b"), " rule out "),
    (re.compile(r"\bc/w\b"), " consistent with "),
    (re.compile(r"\bh/o\b"), " history of "),
    (re.compile(r"\bw/(?=\s|\w)"), " with "),
    (re.compile(r"\band\s*/\s*or\b"), " or "),
    (re.compile(r"\bvs\b\.?"), " versus "),
    # "atelectasis/consolidation" reads as "atelectasis or consolidation".
    (re.compile(r"(?<=[a-z])\s*/\s*(?=[a-z])"), " or "),
    (re.compile(r"(?<=[a-z])-(?=[a-z])"), " "),
)
_TOKEN = re.compile(r"[a-z0-9]+|[;:,?()]")


def _tokenize(sentence: str) -> list[str]:
    text = sentence.lower()
    for pattern, replacement in _CONTRACTIONS + _SHORTHANDS:
        text = pattern.sub(replacement, text)
    return _TOKEN.findall(text)


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------
# (observation, pattern, what must not come right before it). Patterns run over the normalised
# sentence: lower case, one space between tokens, hyphens between letters turned into spaces
# ("ground-glass" -> "ground glass"). The lists follow CheXpert's mention phrases, extended.

# fmt: off
_MENTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("atelectasis", r"atelecta\w*", None),
    ("atelectasis", r"collapsed?|collapses", r"(?:vertebral|vertebra|vertebrae|body|compression|spine|spinal|disc|tracheal|airway|height) $"),
    ("cardiomegaly", r"cardiomegaly", None),
    ("consolidation", r"consolidat\w*", None),
    # Edema is the word edema in the lungs only: congestion, engorgement, cephalization, Kerley
    # lines, fluid overload and heart failure are signs or causes a reader may not call edema.
    ("edema", r"o?edema(?:tous)?", r"(?:soft tissues?|subcutaneous|wall|bowel|mucosal|airway|laryngeal|facial|extremity|scrotal|periportal|gallbladder|marrow|tissue|cerebral) $"),
    ("pleural_effusion", r"effusions?", r"(?:pericardial|joint|knee|pericardial fluid or) $"),
    ("pleural_effusion", r"pleural (?:and|or) pericardial effusions?|pleural fluid|(?:hydro|pyo|hemo|haemo)thora(?:x|ces)|(?:hydro|hemo|haemo)pneumothora(?:x|ces)|empyema", None),
    ("pleural_effusion", r"fluid (?:in|within) the (?:\w+ )?pleural (?:space|cavity)", None),
    ("pneumothorax", r"(?:hydro|hemo|haemo|pyo)?pneumothora(?:x|ces)|ptx", None),
    ("pneumothorax", r"(?:(?:apical |basilar )?pleural air(?: collections?)?|air (?:collection )?(?:in|within) the (?:\w+ )?pleural (?:space|cavity))", None),
    # Pneumonia is named: "infection" alone may be airway, granulomatous or healed disease, and
    # readers of real reports do not code it as pneumonia (it still rules out "no finding").
    ("pneumonia", r"(?:broncho)?pneumonias?|pneumonic|pna|pneumonitis", None),
    ("lung_opacity", r"opaci(?:ty|ties|fication|fications|fied)", r"(?:soft tissue|breast|bone|osseous|metallic|metal|skin|nipple|calcific|calcified|sclerotic) $"),
    ("lung_opacity", r"infiltrat(?:e|es|ion|ions|ive)", None),
    ("lung_opacity", r"densit(?:y|ies)", r"(?:bone|mineral|soft tissue|breast|metallic|metal|calcium|osseous|fat|fluid|water|calcific|calcified|sclerotic) $"),
    ("lung_opacity", r"air ?space (?:disease|process|opacit\w+|filling)|haz(?:y|iness)|ground glass", None),
    ("lung_opacity", r"reticul(?:ar|onodular) (?:opacit\w+|densit\w+)", None),
    ("lung_opacity", r"interstitial (?:opacit\w+|infiltrat\w+)|parenchymal (?:opacit\w+|disease)", None),
    # Internal CheXpert observations: they only decide "no finding".
    ("lung_lesion", r"nodul(?:e|es|ar)|masse?s?|tumou?rs?|neoplasm\w*|carcinoma|cancer|malignan\w+|metasta\w+|cavit(?:y|ies|ary|ation)", r"(?:soft tissue|breast|neck) $"),
    ("lung_lesion", r"lesions?", r"(?:bone|lytic|blastic|sclerotic|osseous|skin|cutaneous|rib|vertebral) $"),
    ("pleural_other", r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis|mass(?:es)?)|fibrothorax", None),
    ("fracture", r"fractur\w+|fx", None),
    ("enlarged_cardiomediastinum", r"(?:widen\w*|enlarge\w*) (?:of )?(?:the )?(?:superior )?mediastin\w+|mediastinal (?:widening|enlargement)", None),
    # Everything else a reader would call abnormal, so that "no finding" means a normal study:
    # healed granulomatous disease, scars, chronic lung and airway changes, lung volumes,
    # diaphragm, aorta and vessels, spine and bones, hernias.
    ("other_abnormality", r"granulom\w+|calcifi\w+|histoplasm\w*|tubercul\w+|scar|scars|scarring|scarred|fibrosis|fibrotic|bronchiectasis|bronchiectatic|bronchitis|(?:bronchial|peribronchial|bronchovascular|fissural|fissure) (?:wall )?(?:thickening|cuffing|markings)|(?:airway|small airways?|reactive airways?) disease|copd|(?:chronic )?obstructive (?:pulmonary|lung|airways?) disease|emphysema\w*|bulla\w*|blebs?|hyper ?(?:inflat\w+|expan\w+|aerat\w+|lucen\w+)|hypo ?(?:inflat\w+|expan\w+|aerat\w+)|(?:low|lower|decreased|reduced|diminished|small) (?:lung )?volumes?|(?:bronchovascular |vascular )?crowding|flatten\w* (?:of )?(?:the )?(?:\w+ )?(?:hemi ?)?diaphragms?|(?:hemi ?)?diaphragms? (?:are |is )?flatten\w*", None),
    ("other_abnormality", r"eventration|(?:elevat\w+|raised) (?:of )?(?:the )?(?:\w+ )?(?:hemi ?)?diaphragms?|(?:hemi ?)?diaphragms? (?:is |are |remains |appears )?(?:\w+ )?(?:elevated|raised)|paralys\w+", None),
    ("other_abnormality", r"atheroscl\w+|tortu\w+|ectasia|ectatic|unfold\w*|aneurysm\w*|dilat\w+ (?:of )?(?:the )?(?:\w+ )?aorta|(?:aorta|aortic \w+) (?:is |are )?(?:dilated|enlarged|prominent)|(?:lymph ?adenopathy|adenopathy|lymph node enlargement)|hilar (?:fullness|prominence|enlargement)|(?:prominen\w+|enlarge\w+|dilat\w+) (?:of )?(?:the )?(?:central )?pulmonary arter\w+|pulmonary (?:arterial |artery )?hypertension", None),
    # Prominent interstitial markings are not called an opacity by readers of real reports.
    ("other_abnormality", r"(?:interstitial|reticul(?:ar|onodular)) (?:markings|pattern|thickening|abnormalit\w+|changes?|(?:lung )?disease|prominence)|(?:prominen\w+|accentuat\w+|increase\w*) (?:of )?(?:the )?(?:interstitial|lung|pulmonary|bronchovascular) markings", None),
    ("other_abnormality", r"(?:vascular |venous |pulmonary vascular |pulmonary venous |interstitial )?congestion|(?:vascular |venous )?engorge(?:ment|d)|(?:fluid|volume) overload|cephalization|kerley(?: b)?(?: lines?)?|interstitial prominence|vascular (?:redistribution|indistinctness|blurring)|(?:congestive )?(?:heart|cardiac) (?:failure|decompensation)|chf", r"(?:hepatic|nasal|sinus|splenic) $"),
    ("other_abnormality", r"degenerat\w+|spondyl\w+|osteophyt\w+|arthriti\w*|arthros\w+|arthropath\w+|(?:dextro|levo|thoraco|thoracolumbar )?scolio\w+|(?:increased )?kyphos\w+|kyphotic|osteopeni\w+|osteoporo\w+|demineraliz\w+|deformit\w+|compression|wedg\w+|(?:loss of|decreased) (?:vertebral )?(?:body )?height|schmorl\w*|sclerosis|sclerotic|lytic|bone islands?|hyperostosis|dish|pectus(?: excavatum| carinatum)?|(?:hiatal|hiatus|diaphragmatic|bochdalek|morgagni) hernias?|hernias?|free (?:intraperitoneal |subdiaphragmatic )?air|pneumoperitoneum|subcutaneous (?:air|emphysema)|pneumomediastinum|foreign bod(?:y|ies)", r"lordotic $"),
    # Blunted costophrenic angles: effusion or pleural thickening; readers of real reports call it
    # an effusion only when they write the word.
    ("other_abnormality", r"infections?|infectious(?: process(?:es)?| etiology| disease)?|infective|inflammat\w+", r"(?:urinary tract|line|wound|catheter) $"),
    ("other_abnormality", r"blunt\w* (?:of )?(?:the )?(?:\w+ ){0,2}(?:costophrenic|cp) (?:angles?|sulc[ui]s?|sulci|recess(?:es)?|xxxx)|(?:costophrenic|cp) (?:angles?|sulcus|sulci|recess(?:es)?|xxxx) (?:is |are )?(?:(?:\w+ly|now) )?blunt\w*", None),
    ("other_abnormality", r"(?:dextro ?|levo ?)?curvature|spurs?|spurring|(?:endplate|end plate) (?:changes|irregularit\w+|sclerosis|spurring)|hypoventilat\w+|(?:lung )?volumes (?:are |is )?(?:\w+ )?(?:low|decreased|reduced|diminished)(?! normal)|lucenc\w+|lucent|prominen\w+ (?:\w+ )?(?:hil\w+|vascularity|vasculature|vessels|epicardial fat|fat pads?)|(?:lobulated|abnormal|irregular) contour|piercings?|nipple (?:rings?|jewelry|piercings?)|jewelry", None),
    # Support devices and the marks of surgery. Unlike CheXpert, they also rule out "no
    # finding": a study with a pacemaker or sternotomy wires is not reported as a normal one.
    ("support_devices", r"(?:endotracheal|tracheostomy|et|ng|og|nasogastric|orogastric|feeding|chest|enteric|dobhoff|gastrostomy|thoracostomy|drainage) tubes?|catheters?|picc|(?:central|venous|arterial|port|midline|swan|pa) lines?|(?:port|mediport|portacath|port a cath)(?: catheter)?|pacemakers?|pacers?|(?:aicd|icd|defibrillators?)|(?:pacer|pacing|pacemaker|cardiac|defibrillator) (?:leads?|wires?|generator)|leads?|generators?|stimulators?|stents?|clips?|sternotomy|sternal (?:wires?|sutures?)|wires|cabg|(?:valve )?prosthe\w+|replacement|hardware|(?:surgical )?(?:plates?|screws?|rods?|fixation|fusion)|post ?(?:surgical|operative)|surgical (?:changes|material)|status post|(?:chole|mast|lob|pneumon|thyroid|segment|wedge )?ectomy|\w+ectomy|implants?|drains?|valves?|filters?|devices?|reservoir|loop recorder|shunt|(?:lines?|tubes?|catheters?) and (?:lines?|tubes?|catheters?)|support (?:devices?|lines?|tubes?)|(?:with |its |the )?tips? (?:at|in|projecting|projects|overlying|overlies|terminat\w+|near|within|positioned|located|in the region)", r"(?:no|without|gastroesophageal|mitral|aortic|tricuspid|pulmonic|pulmonary) $"),
)
# fmt: on

# Mentions that are not mentions of an observation.
_NOT_MENTIONS = re.compile(
    r"(?<!\S)(?:mass effect|infectious disease (?:service|team)|effusion of the knee"
    # An opacity over a rib, the clavicle, a nipple or the breast is not a lung opacity.
    r"|(?:nodular |focal |small |round |rounded |oval |curvilinear |linear )?(?:opacit\w+|densit\w+)(?: \w+){0,3}? (?:overl\w+|projecting over|projected over|over) (?:the )?(?:\w+ ){0,5}?(?:ribs?|clavicles?|breasts?|breast shadows?|nipples?|scapula\w*|humer\w+|glenoid|soft tissues?|chest wall)"
    r")(?!\S)"
)
# Healed infection ("sequelae of prior granulomatous infection", "scarring from old pneumonia")
# is a scar: not a pneumonia, but still an abnormality (other_abnormality sees it).
_HEALED = re.compile(
    r"(?<!\S)(?:"
    r"(?:(?:old|prior|previous|remote|healed|past|chronic) )?(?:granulomatous|tuberculous|tuberculosis|tb|fungal|mycobacterial|histoplasm\w*) (?:infections?|infectious process|disease)"
    r"|(?:old|remote|healed|past|prior|previous) infections?"
    r"|(?:sequela\w*|residua\w*|stigmata|scar\w*) (?:of |from )?(?:(?:an|a|the|old|prior|previous|remote|healed|past) )?(?:\w+ )?(?:infections?|infectious process|pneumonia)"
    r")(?!\S)"
)
_MENTIONS_COMPILED = tuple(
    (
        finding,
        re.compile(rf"(?<!\S)(?:{pattern})(?!\S)"),
        re.compile(rf"(?:{before})\Z") if before else None,
    )
    for finding, pattern, before in _MENTIONS
)

# --------------------------------------------------------------------------------------------
# Heart and mediastinal size statements
# --------------------------------------------------------------------------------------------

_HEART_TERM = re.compile(
    r"(?<!\S)(?:"
    r"(?P<cm>cardio ?mediastinal(?: (?:silhouette|contours?|shadow|outline|size|borders?|width))?)"
    r"|(?P<heart>(?:heart|cardiac) (?:size|silhouette|contours?|shadow|outline|diameter|dimensions?|borders?)"
    r"|(?:heart|cardiac)(?! (?:failure|decompensation|device|pacer|pacemaker|leads?|monitor\w*|valves?|surgery|disease|catheter\w*|wires?|apex|border))"
    r"|cardiothoracic ratio)"
    r"|(?P<med>mediastinal (?:silhouette|contours?|shadow|width|outline)|mediastinum|mediastinal(?= (?:widening|enlargement)))"
    r")(?!\S)"
)
_SIZE_STATE = re.compile(
    r"(?<!\S)(?:"
    r"(?P<borderline>borderline(?: (?:enlarged|enlargement|large|cardiomegaly|size|in size))?)"
    r"|(?P<borderline2>(?:at |in |near )?(?:the )?(?:upper|top|high)(?: (?:limits?|range|end|boundary|side|part))?(?: of)? normal(?: limits)? or (?:\w+ )?enlarged)"
    r"|(?P<topnormal>(?:at |in |near |to )?(?:the )?(?:upper|top|high)(?: (?:limits?|range|end|boundary|side|part))?(?: of)? normal(?: limits)?|(?:near )?top normal|high normal)"
    r"|(?P<normal>normal|within (?:the )?(?:normal )?limits(?: of normal)?|wnl|unremarkable|(?:not|no longer)(?: \w+)? (?:enlarged|large|increased|prominent|widened))"
    r"|(?P<enlarged>enlarg\w*|large|larger|increased|prominen\w+|big|widen\w*|wide|wider)"
    r")(?!\S)"
)
# Tokens a size statement does not reach across.
_SIZE_STOP = _words(
    ", ; ( ) ? but with without however although though whereas except by from due obscured"
    " obscuring there"
)

# --------------------------------------------------------------------------------------------
# Cues
# --------------------------------------------------------------------------------------------
# (kind, direction, pattern). Kinds: "pseudo" (looks like a cue, is not one), "strong" (a
# confident hedge: takes its words, leaves the finding present), "neg", "unc", "hist". Directions: "fwd" (covers what follows, to the end of the clause), "back" (covers the
# noun phrases before it, back to the previous clause), "either" (forward when a mention follows
# in the clause, else backward if the cue is predicative: "pneumonia is possible"), "phrase"
# (only the noun phrase right before it, no list), "adjacent"
# (only the mention right before or after it: "pneumonia?"). Order matters: tokens taken by an
# earlier cue (or by a mention) are not available to later ones.

# fmt: off
_CUES: tuple[tuple[str, str, str], ...] = (
    # Change statements: "no change in the effusion" says the effusion is still there.
    ("pseudo", "fwd", r"(?:no|without|not)(?: \w+)?(?: interval| significant| appreciable| substantial| definite)? (?:change|changes|changed|increase|increased|worsening|worsened|decrease|decreased|progression|progressed|improvement|improved|difference|enlargement)(?: (?:in|of))?"),
    ("pseudo", "fwd", r"not (?:only|necessarily|significantly)|no further|gram negative|no sooner"),
    # "Borderline cardiomegaly" is cardiomegaly (see the heart size states).
    ("pseudo", "fwd", r"borderline(?= (?:(?:mild|enlarged|enlargement|large|increased) )?(?:of )?(?:the )?(?:cardiomegaly|cardiac|heart|cardiomediastinal|cardio))"),
    ("pseudo", "fwd", r"(?:(?:has|have|had) )?(?:not|partially|partly|nearly|almost|incompletely|largely|mostly|slowly|not yet|not completely|not fully|not entirely|only partially|only partly|near completely|near) (?:resolv\w*|cleared|clearing)|(?:partial|near complete|near total|incomplete|near|nearly complete|almost complete) (?:resolution|clearing)|resolving|clearing"),
    # Uncertainty spelled as a negation ("cannot be excluded") or as an alternative.
    ("unc", "fwd", r"with or without"),
    ("unc", "either", r"may or may not(?: be)?"),
    ("unc", "either", r"(?:cannot|can not|could not|may not|might not|do not|does not|unable to|difficult to|hard to|impossible to|not possible to|not) (?:be )?(?:(?:entirely|completely|totally|definitely|definitively|fully|reliably|confidently|absolutely|certainly|safely|clearly|firmly) )?(?:exclude|rule out)"),
    ("unc", "back", r"(?:cannot|can not|could not|may not|might not|should not|is not|are not|was not|were not|has not|have not|not|unable to|difficult to|hard to)(?: be| been)? (?:(?:entirely|completely|totally|definitely|definitively|fully|reliably|confidently|absolutely|certainly|safely|clearly|firmly) )?(?:be )?(?:excluded|ruled out)"),
    ("unc", "back", r"(?:cannot|can not|could not|not well|not|difficult to|hard to|unable to)(?: be)? (?:assessed|evaluated|assess|evaluate)"),
    ("neg", "either", r"(?:is |are |seems |appears |would be )?(?:unlikely|not likely|improbable)"),
    # "... appear within (normal) limits": what precedes is normal.
    ("neg", "phrase", r"(?:(?:is|are|was|were|appears?|seems?|remains?) )?(?:grossly |otherwise )?(?:within (?:the )?(?:normal )?(?:limits|range)(?: of normal)?|wnl)"),
    # "to be ruled out": a question, not an answer.
    ("unc", "back", r"(?:(?:is|are) )?(?:to|should|must|needs? to|has to|have to) be (?:excluded|ruled out)"),
    # Post-negation: "not suspected", "pneumothorax is not seen", "the effusion has resolved".
    ("neg", "back", r"(?:(?:is|are|was|were) )?not (?:suspected|favou?red|considered|expected|felt|thought)(?: to be(?: present)?)?"),
    ("neg", "back", r"(?:(?:is|are|was|were|has|have|had|can|could|may)(?: be| been)? )?(?:not|no longer)(?: be)?(?: \w+)? (?:seen|identified|present|demonstrated|visuali[sz]ed|visible|evident|appreciated|noted|detected|depicted|observed|apparent|identifiable|shown|found|recogni[sz]ed|delineated|definable|re ?demonstrated|re ?identified)"),
    ("neg", "back", r"(?:is|are|was|were|has|have|had)(?: been)? (?:now )?(?:completely |fully |entirely |since )?(?:resolved|cleared|disappeared|gone|removed|absent|excluded|ruled out)|(?:is|are|was|were) (?:negative|none)"),
    # Historical: not a statement about this image.
    ("hist", "fwd", r"(?:past |prior |previous |known |remote )?(?:medical )?(?:history|hx) of|(?:being |was |were )?treated for|treatment (?:for|of)|(?:tubes?|catheters?|drains?|pigtails?|thoracostomy|thoracentesis|drainage)(?: \w+){0,2} for"),
    # Pre-negation.
    ("neg", "fwd", r"clear(?= (?:\w+ )?(?:air ?space|consolidat\w*|infiltrat\w*|opacit\w+|effusions?|pneumothora\w+|edema))"),
    ("neg", "fwd", r"no|not|without|neither|nor|free of|clear of|negative for|absence of|lack of|lacks|(?:interval )?resolution of|disappearance of|(?:interval )?removal of|fails? to (?:show|demonstrate|reveal)|no longer|rules out|excludes|excluding"),
    ("neg", "either", r"resolved|cleared|disappeared|gone|absent|excluded|ruled out"),
    # Confident hedges ("probable", "likely", "most suggestive of", "favored") keep a finding
    # present: they take their tokens so that no weaker cue inside them applies. "Less likely"
    # stays uncertain.
    ("unc", "either", r"less likely|less probable"),
    ("strong", "either", r"(?:(?:probably|likely|most likely|more likely|presumably|presumed)(?: also| well| still)? (?:be )?(?:represent\w*|reflect\w*|indicat\w*|relat\w*(?: to)?|due to|secondary to|attributable to|caused by|from|signify\w*|account\w*(?: for)?|correspond\w*(?: to)?))|(?:(?:is|are) )?(?:favou?red|thought|felt|believed) to (?:be|represent|reflect)|most (?:suggestive|consistent|compatible|indicative|characteristic|typical) (?:of|with)|(?:most |more )?likely|probabl[ey]|presum\w+|favou?r(?:s|ed|ing)?"),
    # Uncertainty. A modal with "be present"-like words looks back ("effusion may be present");
    # a hedge followed by "represent"/"due to" covers only its object ("opacity may be due to
    # scarring" leaves the opacity certain).
    ("unc", "back", r"(?:may|might|could)(?: also| still| well)?(?: not)? (?:be|have been|exist|persist)(?: \w+)? (?:seen|identified|present|demonstrated|visuali[sz]ed|visible|evident|appreciated|noted|detected|depicted|observed|apparent|identifiable|shown|found|recogni[sz]ed|delineated|definable|re ?demonstrated|re ?identified|there)"),
    ("unc", "fwd", r"(?:(?:may|might|could|possibly|perhaps|conceivably)(?: also| well| still)? (?:be )?(?:represent\w*|reflect\w*|indicat\w*|relat\w*(?: to)?|due to|secondary to|attributable to|caused by|from|signify\w*|account\w*(?: for)?|correspond\w*(?: to)?))|(?:may|might|could)(?: also| well| still)?(?: be)?"),
    ("unc", "fwd", r"suspicio\w+ (?:for|of)|suggestive of|suggest(?:s|ing)?|concern(?:ing)? (?:for|of|about)|worr\w+ (?:for|of|about)|question of|possibility (?:of|for)|differential(?: diagnosis| diagnoses| considerations?)?(?: (?:includes?|considerations?|of|is|are))?|considerations? (?:includes?|are|is)|rather than|as opposed to|rule out|(?:to )?exclude|evaluat\w+ (?:for|of)|evaluate|assess\w* (?:for|of)|(?:clinical(?:ly)? )?correlat\w+(?: clinically)?(?: (?:is|are) (?:recommended|advised|suggested|needed|requested|indicated))?(?: (?:for|to (?:exclude|evaluate for|assess for|rule out)))|in the (?:appropriate|proper|right|correct) clinical (?:setting|context)|consider|cannot be distinguished from|indistinguishable from|atypical for"),
    ("unc", "either", r"possible|possibly|suspect\w*|suspicious|suggested|concerning|worrisome|question(?:able|ably|ed)?|query|borderline|equivocal|indeterminate|uncertain|not certain|considered|consideration|potential(?:ly)?|perhaps|maybe|conceivabl[ye]|if (?:any|present)"),
    ("unc", "adjacent", r"\?"),
)
# fmt: on
_CUE_PATTERNS = tuple(
    (kind, direction, re.compile(rf"(?<!\S)(?:{pattern})(?!\S)"))
    for kind, direction, pattern in _CUES
)

# Clause structure.
_HARD_BREAKS = _words(
    "; but however although though whereas yet except nevertheless nonetheless otherwise while"
    " whereby apart aside"
)
_HARD_PHRASES = re.compile(
    r"(?<!\S)(?:other than|with the exception of|in addition|additionally)(?!\S)"
)
_SEPARATORS = _words(", and or nor with plus including")
# Cues that introduce a list of candidates; their scope is the rest of the clause.
_LIST_CUES = re.compile(r"differential|considerations?\b|in the \w+ clinical")
# "with" after these joins a finding to its description, not a new statement.
_WITH_JOINED = _words("compatible consistent associated along together")
_DISJUNCTIONS = _words("or nor")
_COORDINATORS = _words("and or nor plus")
# Hedges used as adjectives inside a list ("no suspicious opacity or effusion").
_ATTRIBUTIVE_HEDGES = _words("suspicious worrisome concerning")
_CLAUSE_STARTERS = _words("there the it this these those which that lungs heart")
_FINITE_VERBS = _words(
    "is are was were has have had remain remains remained persist persists persisted persisting"
    " appear appears appeared seem seems measure measures demonstrates shows extend extends"
    " involves represents obscures continue continues project projects resolved increased"
    " decreased improved worsened developed"
)
_AUXILIARIES = _words("is are was were has have had remain remains appears seems")
# After a verb, these make it part of a negated list ("..., or pneumothorax is seen").
_EXISTENCE = _words(
    "seen identified present noted demonstrated visualized visualised evident appreciated"
    " detected observed apparent depicted shown found not no been"
)
_COPULAS = _words(
    "is are was were be been being remains remain appears appear seems seem also still now felt"
    " thought"
)
_PREDICATE_FOLLOWERS = _words(
    ", and or ? ( given in at on of clinically based as to within along per from since"
    " bilaterally there here seen present noted identified again today"
)
# A comma or "and" followed by these starts a new statement, unless an or-list is going on:
# "no pneumothorax, mild cardiomegaly" vs "no consolidation, large effusion, or pneumothorax".
_POSITIVE_MODIFIERS = _words(
    "mild mildly moderate moderately severe severely marked markedly extensive stable persistent"
    " persisting unchanged increased increasing worsening worsened improving improved decreased"
    " decreasing new newly small large trace tiny minimal minor subtle slight slightly left right"
    " bilateral bibasilar bibasal layering loculated residual patchy streaky linear platelike"
    " plate discoid subsegmental lobar multifocal diffuse basilar retrocardiac perihilar known"
    " chronic developing early interval a an"
)


@dataclass(frozen=True)
class _Cue:
    kind: str
    direction: str
    start: int
    end: int
    text: str


@dataclass
class _Span:
    finding: str
    start: int
    end: int
    base: int  # the label before cues: 1, or 0/-1 for size statements
    normal_range: bool = False  # "upper limits of normal": uncertain, yet no bar to no_finding


class _Sentence:
    """One normalised sentence: tokens, clause boundaries, mentions and cues."""

    def __init__(self, raw: str) -> None:
        self.tokens = _tokenize(raw)
        self.text = " ".join(self.tokens)
        self.starts: list[int] = []
        offset = 0
        for token in self.tokens:
            self.starts.append(offset)
            offset += len(token) + 1
        self.clause_of = self._clauses()
        self.separator = [
            token in _SEPARATORS
            and not (token == "with" and i > 0 and self.tokens[i - 1] in _WITH_JOINED)
            for i, token in enumerate(self.tokens)
        ]

    # ---- positions
    def span(self, match: re.Match[str]) -> tuple[int, int]:
        return (
            bisect.bisect_right(self.starts, match.start()) - 1,
            bisect.bisect_left(self.starts, match.end()),
        )

    def _clauses(self) -> list[int]:
        """Clause number of every token; hard breaks belong to no clause (-1)."""
        hard = [token in _HARD_BREAKS for token in self.tokens]
        for match in _HARD_PHRASES.finditer(self.text):
            start, end = self.span(match)
            for i in range(start, end):
                hard[i] = True
        clause_of: list[int] = []
        clause = 0
        for i, is_break in enumerate(hard):
            if is_break:
                clause_of.append(-1)
                if i == 0 or not hard[i - 1]:
                    clause += 1
            else:
                clause_of.append(clause)
        return clause_of

    def clause_bounds(self, index: int) -> tuple[int, int]:
        clause = self.clause_of[index]
        start = index
        while start > 0 and self.clause_of[start - 1] == clause:
            start -= 1
        end = index
        while end < len(self.tokens) and self.clause_of[end] == clause:
            end += 1
        return start, end

    # ---- clause-internal structure
    def _has_own_verb(self, start: int, end: int) -> bool:
        """True when tokens[start:end] contain a finite verb that is not "is seen"-like."""
        for i in range(start, end):
            if self.tokens[i] in _FINITE_VERBS:
                following = self.tokens[i + 1] if i + 1 < end else ""
                if following not in _EXISTENCE:
                    return True
        return False

    def _segment_end(self, start: int, clause_end: int) -> int:
        i = start
        while i < clause_end and not self.separator[i]:
            i += 1
        return i

    def _starts_clause(self, separator: int, clause_end: int, cue_starts: set[int]) -> bool:
        """Does the segment after the separator at ``separator`` start a clause of its own?"""
        sep = self.tokens[separator]
        if sep in _DISJUNCTIONS:
            return False
        start = separator + 1
        end = self._segment_end(start, clause_end)
        if start >= end:
            return False
        first = self.tokens[start]
        disjunct_after = any(t in _DISJUNCTIONS for t in self.tokens[start:clause_end])
        if first in _ATTRIBUTIVE_HEDGES and disjunct_after:
            # "no consolidation, suspicious opacity, or effusion": an item of the negated list.
            return False
        if first in _CLAUSE_STARTERS or start in cue_starts:
            return True
        if self._has_own_verb(start, end):
            return True
        return first in _POSITIVE_MODIFIERS and not disjunct_after

    def forward_scope(self, cue: _Cue, cue_starts: set[int]) -> tuple[int, int]:
        if cue.end >= len(self.tokens):
            return cue.end, cue.end
        if self.clause_of[cue.end] == -1:
            return cue.end, cue.end
        _, clause_end = self.clause_bounds(cue.end)
        if _LIST_CUES.match(cue.text):
            # "differential includes A, B and mild C": every item of the list is a candidate.
            return cue.end, clause_end
        for i in range(cue.end, clause_end):
            if self.separator[i] and self._starts_clause(i, clause_end, cue_starts):
                return cue.end, i
        return cue.end, clause_end

    def is_predicative(self, cue: _Cue) -> bool:
        """Is the cue said of what precedes it ("pneumonia is possible", "effusion, resolved")?

        True after a copula, or when nothing but a preposition or separator follows it in its
        clause; false for an attributive use with its own object ("possible scarring").
        """
        if cue.start > 0 and self.tokens[cue.start - 1] in _COPULAS:
            return True
        if cue.end >= len(self.tokens) or self.clause_of[cue.end] == -1:
            return True
        return self.tokens[cue.end] in _PREDICATE_FOLLOWERS

    def backward_scope(self, cue: _Cue) -> tuple[int, int]:
        if cue.start == 0 or self.clause_of[cue.start - 1] == -1:
            return cue.start, cue.start
        clause_start, _ = self.clause_bounds(cue.start - 1)
        # Walk back over segments; stop before one that is a clause of its own. A bare comma is
        # only crossed inside a coordinated list ("A, B and C are not seen"): without a
        # conjunction nearer the cue, "atelectasis, pneumonia not excluded" is two statements.
        start = cue.start
        i = cue.start - 1
        coordinated = False
        while i >= clause_start:
            if self.separator[i]:
                if self.tokens[i] in _COORDINATORS:
                    coordinated = True
                elif self.tokens[i] == "," and not coordinated:
                    break
                seg_start = i - 1
                while seg_start >= clause_start and not self.separator[seg_start]:
                    seg_start -= 1
                seg_start += 1
                if self._has_own_verb(seg_start, i):
                    break
                start = seg_start
                i = seg_start - 1
                continue
            start = i
            i -= 1
        return start, cue.start


def _find_spans(sentence: _Sentence) -> list[_Span]:
    text = sentence.text
    spans: list[_Span] = []
    blocked = [sentence.span(m) for m in _NOT_MENTIONS.finditer(text)]
    healed = [sentence.span(m) for m in _HEALED.finditer(text)]
    for finding, pattern, unless_before in _MENTIONS_COMPILED:
        for match in pattern.finditer(text):
            if unless_before is not None and unless_before.search(text, 0, match.start()):
                continue
            start, end = sentence.span(match)
            if any(b_start <= start < b_end for b_start, b_end in blocked) or (
                finding != "other_abnormality"
                and any(h_start <= start < h_end for h_start, h_end in healed)
            ):
                continue
            spans.append(_Span(finding, start, end, POSITIVE))
    spans.extend(_size_spans(sentence, spans))
    # One span per observation and position: drop those inside a longer one of the same kind.
    spans.sort(key=lambda s: (s.start, -(s.end - s.start)))
    kept: list[_Span] = []
    for span in spans:
        if any(
            k.finding == span.finding and k.start <= span.start and span.end <= k.end for k in kept
        ):
            continue
        kept.append(span)
    return kept


def _size_spans(sentence: _Sentence, others: list[_Span]) -> list[_Span]:
    """Turn "heart size is normal" / "enlarged cardiac silhouette" into size mentions."""
    tokens = sentence.tokens
    mention_starts = {s.start for s in others}
    mention_ends = {s.end for s in others}
    result: list[_Span] = []
    for term in _HEART_TERM.finditer(sentence.text):
        t_start, t_end = sentence.span(term)
        # Forward: "heart size is normal", "heart and mediastinum are within normal limits".
        candidates: list[tuple[int, int, int, str]] = []  # (distance, start, end, state)
        seen_verb = False
        j = t_end
        while j < min(len(tokens), t_end + 9):
            token = tokens[j]
            if token in _SIZE_STOP or j in mention_starts or sentence.clause_of[j] == -1:
                break
            if seen_verb and token in {"and", ","}:
                break
            seen_verb = seen_verb or token in _FINITE_VERBS
            j += 1
        forward_text = " ".join(tokens[t_end:j])
        for state in _SIZE_STATE.finditer(forward_text):
            s_start = t_end + len(forward_text[: state.start()].split())
            s_end = s_start + len(state.group(0).split())
            candidates.append((s_start - t_end, t_start, s_end, state.lastgroup or ""))
            break
        # Backward: "normal heart size", "enlargement of the cardiac silhouette".
        j = t_start
        while j > max(0, t_start - 4):
            token = tokens[j - 1]
            if (
                token in _SIZE_STOP
                or token in _AUXILIARIES
                or token == "and"
                or j in mention_ends
                or sentence.clause_of[j - 1] == -1
            ):
                break
            j -= 1
        backward_text = " ".join(tokens[j:t_start])
        states = list(_SIZE_STATE.finditer(backward_text))
        if states:
            state = states[-1]
            s_start = j + len(backward_text[: state.start()].split())
            candidates.append(
                (
                    t_start - (s_start + len(state.group(0).split())),
                    s_start,
                    t_end,
                    state.lastgroup or "",
                )
            )
        if not candidates:
            continue
        _, start, end, state = min(candidates)
        # Borderline size counts as enlarged (as coders of real reports count it); "upper limits
        # of normal" / "top normal" stays uncertain.
        base = {
            "normal": NEGATIVE,
            "topnormal": UNCERTAIN,
            "borderline": POSITIVE,
            "borderline2": POSITIVE,  # "upper limits of normal or mildly enlarged"
            "enlarged": POSITIVE,
        }[state]
        kind = term.lastgroup
        if kind == "heart":
            result.append(_Span("cardiomegaly", start, end, base, state == "topnormal"))
        elif kind == "cm":
            result.append(_Span("enlarged_cardiomediastinum", start, end, base))
            if base == NEGATIVE:
                result.append(_Span("cardiomegaly", start, end, base))
        else:
            result.append(_Span("enlarged_cardiomediastinum", start, end, base))
    return result


def _find_cues(sentence: _Sentence, spans: list[_Span]) -> list[_Cue]:
    taken = [False] * len(sentence.tokens)
    for span in spans:
        if span.finding == "support_devices":  # "chest tube for pneumothorax" is a cue
            continue
        for i in range(span.start, span.end):
            taken[i] = True
    cues: list[_Cue] = []
    for kind, direction, pattern in _CUE_PATTERNS:
        for match in pattern.finditer(sentence.text):
            start, end = sentence.span(match)
            if any(taken[start:end]):
                continue
            for i in range(start, end):
                taken[i] = True
            cues.append(_Cue(kind, direction, start, end, match.group(0)))
    cues.sort(key=lambda c: c.start)
    return cues


def _cue_covers(
    sentence: _Sentence, cue: _Cue, spans: list[_Span], cue_starts: set[int]
) -> list[int]:
    """Indices of the spans a cue applies to."""
    if cue.direction == "adjacent":
        return [i for i, s in enumerate(spans) if s.start == cue.end or s.end == cue.start]
    if cue.direction == "phrase":
        # Only the noun phrase right before the cue, not a list: in "mild cardiomegaly and
        # pulmonary vascularity within normal limits" the limits are the vascularity's.
        lo = cue.start
        while lo > 0 and not sentence.separator[lo - 1] and sentence.clause_of[lo - 1] != -1:
            lo -= 1
        return [i for i, s in enumerate(spans) if lo <= s.start and s.end <= cue.start]
    if cue.direction in ("fwd", "either"):
        lo, hi = sentence.forward_scope(cue, cue_starts)
        forward = [i for i, s in enumerate(spans) if lo <= s.start < hi]
        if cue.direction == "fwd" or forward or not sentence.is_predicative(cue):
            return forward
    lo, hi = sentence.backward_scope(cue)
    return [i for i, s in enumerate(spans) if lo <= s.start < hi and s.end <= hi]


_ALTERNATIVES = frozenset({"or", "versus"})
_ALTERNATIVE_BARRIERS = _SEPARATORS | _HARD_BREAKS


def _alternatives(sentence: _Sentence, spans: list[_Span], cues: list[_Cue]) -> set[int]:
    """Spans joined by "or"/"versus" that no cue took: "atelectasis or pneumonia".

    The left alternative must end right before the conjunction ("versus" allows a short
    location phrase in between); the right one must start within three tokens after it.
    """
    taken = {i for cue in cues if cue.text not in _ALTERNATIVES for i in range(cue.start, cue.end)}
    result: set[int] = set()
    tokens = sentence.tokens
    for j, token in enumerate(tokens):
        if token not in _ALTERNATIVES or j in taken:
            continue
        left_gap = 5 if token == "versus" else 1
        for i, span in enumerate(spans):
            if span.end <= j:
                between = tokens[span.end : j]
                if len(between) <= left_gap and not set(between) & _ALTERNATIVE_BARRIERS:
                    result.add(i)
            elif span.start > j:
                between = tokens[j + 1 : span.start]
                if len(between) <= 3 and not set(between) & _ALTERNATIVE_BARRIERS:
                    result.add(i)
    return result


def find_mentions(text: str) -> list[Mention]:
    """Every mention in ``text`` with the label its cues give it, in reading order.

    This is what :func:`label_report` aggregates; it is public so that a reader can see why a
    report got its labels.
    """
    return [mention for mention, _ in _labelled_mentions(text)]


def _labelled_mentions(text: str) -> list[tuple[Mention, bool]]:
    """Mentions, each with whether it is a bar to ``no_finding`` when positive or uncertain."""
    mentions: list[tuple[Mention, bool]] = []
    for number, raw in enumerate(split_sentences(text)):
        sentence = _Sentence(raw)
        if not sentence.tokens:
            continue
        spans = _find_spans(sentence)
        if not spans:
            continue
        cues = _find_cues(sentence, spans)
        cue_starts = {c.start for c in cues if c.kind in ("neg", "unc", "hist")}
        decided: dict[int, list[_Cue]] = {i: [] for i in range(len(spans))}
        for cue in cues:
            if cue.kind in ("pseudo", "strong"):
                continue
            for i in _cue_covers(sentence, cue, spans, cue_starts):
                decided[i].append(cue)
        alternatives = _alternatives(sentence, spans, cues)
        for i, span in enumerate(spans):
            kinds = {c.kind for c in decided[i]}
            if "hist" in kinds:
                continue
            if span.base == NEGATIVE or "neg" in kinds:
                label = NEGATIVE
            elif "unc" in kinds:
                label = UNCERTAIN
            else:
                label = span.base
            cue_text = tuple(c.text for c in decided[i]) + (
                ("or/versus",) if i in alternatives else ()
            )
            mention = Mention(
                finding=span.finding,
                sentence=number,
                start=span.start,
                end=span.end,
                text=" ".join(sentence.tokens[span.start : span.end]),
                label=label,
                cues=cue_text,
            )
            mentions.append((mention, not span.normal_range))
    return mentions


def aggregate(labels: Iterable[int]) -> int | None:
    """CheXpert's rule: any positive -> 1, else any uncertain -> -1, else any negative -> 0."""
    seen = set(labels)
    if POSITIVE in seen:
        return POSITIVE
    if UNCERTAIN in seen:
        return UNCERTAIN
    if NEGATIVE in seen:
        return NEGATIVE
    return None


def label_report(text: str) -> dict[str, int | None]:
    """Label one report: 1 present, 0 absent, -1 uncertain, ``None`` not mentioned.

    Returns every name in :data:`FINDINGS`, in that order. ``no_finding`` is 1 or ``None``
    (see the module docstring for the rule and the other choices made).
    """
    if not isinstance(text, str):
        raise TypeError(f"label_report expects report text as str, got {type(text).__name__}")
    labels: dict[str, int | None] = dict.fromkeys(FINDINGS)
    if not text.strip():
        return labels
    by_finding: dict[str, list[int]] = {}
    abnormal = False
    for mention, bars_no_finding in _labelled_mentions(text):
        by_finding.setdefault(mention.finding, []).append(mention.label)
        abnormal = abnormal or (bars_no_finding and mention.label in (POSITIVE, UNCERTAIN))
    for finding in PATHOLOGIES:
        labels[finding] = aggregate(by_finding.get(finding, ()))
    labels["no_finding"] = None if abnormal else POSITIVE
    return labels


def to_states(labels: Mapping[str, int | None]) -> dict[str, str]:
    """Map 1/0/-1/None labels to "present"/"absent"/"uncertain"/"not_mentioned"."""
    return {name: STATE_NAMES[value] for name, value in labels.items()}


def label_report_states(text: str) -> dict[str, str]:
    """:func:`label_report` with the state names used by ``ModelResult.findings``."""
    return to_states(label_report(text))
