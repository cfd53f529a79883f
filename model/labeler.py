"""Rule-based finding labeler for chest radiograph report text, in the style of the CheXpert labeler.

The paper scores CXR-LLaVA by running the Stanford CheXpert labeler over generated and reference
reports. That labeler needs Java, NLTK data and a constituency parser; the node cannot ship it.
This module gives the same kind of answer in-process, from plain Python and regular expressions:

1. **Sections.** Text under history-like headers (INDICATION, HISTORY, COMPARISON, TECHNIQUE, ...)
   describes the question, not the image, and is dropped. FINDINGS and IMPRESSION are kept.
2. **Sentences and clauses.** Sentences split on full stops and on line breaks that start a new
   line of thought. Clauses end at ``;``, ``but``, ``however``, ``although``, ``though``,
   ``whereas``, ``except``, ``other than`` ...; a comma or ``and`` also ends a clause when what
   follows is a clause of its own (it starts with ``there``/``the``/``it``, has its own finite
   verb, or opens with a new cue or - outside an ``or``-list - a positive modifier such as
   ``mild``, ``small``, ``left``).
3. **Mentions.** Curated phrase lists per observation (CheXpert's vocabulary, extended), plus a
   small parser for statements about heart size ("heart size is normal" is a negative mention of
   cardiomegaly, "top-normal heart size" an uncertain one).
4. **Cues with scopes.** Negation cues ("no", "without", "free of", "negative for", "resolved",
   "is not seen", "has resolved", "are absent", "is excluded"), uncertainty cues ("may",
   "possible", "likely", "suggestive of", "concerning for", "cannot be excluded", "rather than",
   "versus" ...), historical cues ("history of", "chest tube for") and pseudo-cues that look like
   negation but are not ("no change in", "no increase in", "not resolved", "partially resolved").
   A pre-cue covers what follows it to the end of its clause; a post-cue covers the noun phrases
   before it back to the previous clause, crossing a bare comma only inside a coordinated list
   ("effusion, consolidation and pneumothorax are not seen" vs "atelectasis, pneumonia not
   excluded"). Hedges such as "possible" or "likely" look forward when a mention follows and
   back only when used predicatively ("pneumonia is possible"), so "possible scarring" or
   "opacity may be due to scarring" leave the opacity certain. Double negation ("cannot be
   excluded", "not ruled out") is uncertainty. When both a negation and an uncertainty cue cover a mention, negation wins
   ("no findings to suggest pneumonia" is negative), as in NegBio. Mentions joined by ``or`` /
   ``versus`` / ``and/or`` are uncertain unless negated ("atelectasis or pneumonia").
5. **Aggregation** over mentions, as CheXpert does: any positive -> 1, else any uncertain -> -1,
   else any negative -> 0, else not mentioned (``None``).

Choices, where radiology language or CheXpert leaves room (each chosen for human-label agreement):

- ``no_finding`` is 1 when no pathology - ours, plus CheXpert's enlarged cardiomediastinum,
  lung lesion, pleural other and fracture, which are detected internally but not returned - is
  positive or uncertain, and ``None`` otherwise (CheXpert never writes 0 there). Support devices do
  not count. Blank or whitespace-only text gives ``None`` everywhere: an empty model output is a
  failure, not a normal study.
- "no large effusion" alone is negative (CheXpert); a positive mention elsewhere ("small left
  effusion") still wins through aggregation, and a negation never reaches back across a clause.
- Lung opacity is only labelled from opacity words (opacity, infiltrate, density, airspace
  disease, haziness, ground glass, interstitial markings); consolidation, edema or pneumonia do not
  imply it.
- Heart size: "normal"/"unremarkable"/"within normal limits"/"not enlarged" -> cardiomegaly 0;
  "enlarged"/"large"/"increased"/"prominent" -> 1; "borderline", "top normal", "upper limits of
  normal" -> -1; "heart size is stable" alone says nothing -> ``None``. A normal
  *cardiomediastinal* silhouette also gives cardiomegaly 0; an enlarged one is enlarged
  cardiomediastinum, not cardiomegaly (CheXpert's hierarchy).
- "clear lungs" is not a mention of anything (as in CheXpert): it leaves every pathology
  ``None`` and so gives ``no_finding`` 1.
- "unchanged", "stable", "improving", "decreased", "resolving", "partially resolved" keep a
  finding positive; "resolved", "cleared", "no longer seen" make it negative.
- "unlikely", "not likely" and "not suspected" are negative; "likely", "probable", "suspected"
  are uncertain (as in CheXpert); "consistent with" and "compatible with" are positive.
- "X rather than Y": X keeps its own label, Y is uncertain.
- Unlike CheXpert, "CHF"/"heart failure" (edema) does not also make cardiomegaly uncertain:
  human readers do not infer heart size from the words.
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
_EXTRA: tuple[str, ...] = ("enlarged_cardiomediastinum", "lung_lesion", "pleural_other", "fracture")

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
    ("edema", r"o?edema(?:tous)?", r"(?:soft tissues?|subcutaneous|wall|bowel|mucosal|airway|laryngeal|facial|extremity|scrotal|periportal|gallbladder|marrow|tissue|cerebral) $"),
    ("edema", r"(?:congestive )?(?:heart|cardiac) (?:failure|decompensation)|chf", None),
    ("edema", r"(?:(?:pulmonary |vascular |venous |pulmonary vascular |pulmonary venous |interstitial )?congestion)", r"(?:hepatic|nasal|sinus|splenic) $"),
    ("edema", r"(?:vascular |venous )?engorge(?:ment|d)", None),
    ("edema", r"(?:fluid|volume) overload|cephalization|kerley(?: b)?(?: lines?)?|interstitial prominence", None),
    ("edema", r"vascular (?:redistribution|indistinctness|blurring)|indistinct (?:pulmonary )?(?:vasculature|vessels|vascular markings)", None),
    ("pleural_effusion", r"effusions?", r"(?:pericardial|joint|knee|pericardial fluid or) $"),
    ("pleural_effusion", r"pleural (?:and|or) pericardial effusions?|pleural fluid|(?:hydro|pyo)thora(?:x|ces)|hydropneumothora(?:x|ces)|empyema", None),
    ("pleural_effusion", r"fluid (?:in|within) the (?:\w+ )?pleural (?:space|cavity)", None),
    ("pleural_effusion", r"blunt\w* (?:of )?(?:the )?(?:\w+ ){0,2}(?:costophrenic|cp) (?:angles?|sulc[ui]s?|sulci|recess(?:es)?)", None),
    ("pleural_effusion", r"(?:costophrenic|cp) (?:angles?|sulcus|sulci) (?:is |are )?(?:(?:\w+ly|now) )?blunt\w*", None),
    ("pneumothorax", r"(?:hydro)?pneumothora(?:x|ces)|ptx", None),
    ("pneumonia", r"(?:broncho)?pneumonias?|pneumonic|pna|infections?|infectious(?: process(?:es)?)?|infective", r"(?:urinary tract|line|wound|catheter) $"),
    ("lung_opacity", r"opaci(?:ty|ties|fication|fications|fied)", r"(?:soft tissue|breast|bone|osseous|metallic|metal|skin|nipple) $"),
    ("lung_opacity", r"infiltrat(?:e|es|ion|ions|ive)", None),
    ("lung_opacity", r"densit(?:y|ies)", r"(?:bone|mineral|soft tissue|breast|metallic|metal|calcium|osseous|fat|fluid|water) $"),
    ("lung_opacity", r"air ?space (?:disease|process|opacit\w+|filling)|haz(?:y|iness)|ground glass", None),
    ("lung_opacity", r"reticul(?:ar|onodular) (?:opacit\w+|markings|pattern|densit\w+|changes?)", None),
    ("lung_opacity", r"interstitial (?:markings|opacit\w+|pattern|thickening|abnormalit\w+|(?:lung )?disease)|parenchymal (?:opacit\w+|disease)", None),
    # Internal CheXpert observations: they only decide "no finding".
    ("lung_lesion", r"nodul(?:e|es|ar)|masse?s?|tumou?rs?|neoplasm\w*|carcinoma|cancer|malignan\w+|metasta\w+|cavit(?:y|ies|ary|ation)", r"(?:soft tissue|breast|neck) $"),
    ("lung_lesion", r"lesions?", r"(?:bone|lytic|blastic|sclerotic|osseous|skin|cutaneous|rib|vertebral) $"),
    ("pleural_other", r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis|mass(?:es)?)|fibrothorax", None),
    ("fracture", r"fractur\w+|fx", None),
    ("enlarged_cardiomediastinum", r"(?:widen\w*|enlarge\w*) (?:of )?(?:the )?(?:superior )?mediastin\w+|mediastinal (?:widening|enlargement)", None),
)
# fmt: on

# Mentions that are not mentions of an observation.
_NOT_MENTIONS = re.compile(
    r"(?<!\S)(?:mass effect|infectious disease (?:service|team)|effusion of the knee)(?!\S)"
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
    r"(?P<borderline>borderline(?: (?:enlarged|cardiomegaly|size|in size))?|(?:at |in )?(?:the )?(?:upper|top|high)(?: (?:limits?|range|end|boundary|side|part))?(?: of)? normal|top normal|high normal)"
    r"|(?P<normal>normal|within normal limits|wnl|unremarkable|(?:not|no longer)(?: \w+)? (?:enlarged|large|increased|prominent|widened))"
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
# (kind, direction, pattern). Kinds: "pseudo" (looks like a cue, is not one), "neg", "unc",
# "hist". Directions: "fwd" (covers what follows, to the end of the clause), "back" (covers the
# noun phrases before it, back to the previous clause), "either" (forward when a mention follows
# in the clause, else backward if the cue is predicative: "pneumonia is possible"), "adjacent"
# (only the mention right before or after it: "pneumonia?"). Order matters: tokens taken by an
# earlier cue (or by a mention) are not available to later ones.

# fmt: off
_CUES: tuple[tuple[str, str, str], ...] = (
    # Change statements: "no change in the effusion" says the effusion is still there.
    ("pseudo", "fwd", r"(?:no|without|not)(?: \w+)?(?: interval| significant| appreciable| substantial| definite)? (?:change|changes|changed|increase|increased|worsening|worsened|decrease|decreased|progression|progressed|improvement|improved|difference|enlargement)(?: (?:in|of))?"),
    ("pseudo", "fwd", r"not (?:only|necessarily|significantly)|no further|gram negative|no sooner"),
    ("pseudo", "fwd", r"(?:(?:has|have|had) )?(?:not|partially|partly|nearly|almost|incompletely|largely|mostly|slowly|not yet|not completely|not fully|not entirely|only partially|only partly|near completely|near) (?:resolv\w*|cleared|clearing)|(?:partial|near complete|near total|incomplete|near|nearly complete|almost complete) (?:resolution|clearing)|resolving|clearing"),
    # Uncertainty spelled as a negation ("cannot be excluded") or as an alternative.
    ("unc", "fwd", r"with or without"),
    ("unc", "either", r"may or may not(?: be)?"),
    ("unc", "either", r"(?:cannot|can not|could not|may not|might not|do not|does not|unable to|difficult to|hard to|impossible to|not possible to|not) (?:be )?(?:(?:entirely|completely|totally|definitely|definitively|fully|reliably|confidently|absolutely|certainly|safely|clearly|firmly) )?(?:exclude|rule out)"),
    ("unc", "back", r"(?:cannot|can not|could not|may not|might not|should not|is not|are not|was not|were not|has not|have not|not|unable to|difficult to|hard to)(?: be| been)? (?:(?:entirely|completely|totally|definitely|definitively|fully|reliably|confidently|absolutely|certainly|safely|clearly|firmly) )?(?:be )?(?:excluded|ruled out)"),
    ("unc", "back", r"(?:cannot|can not|could not|not well|not|difficult to|hard to|unable to)(?: be)? (?:assessed|evaluated|assess|evaluate)"),
    ("neg", "either", r"(?:is |are |seems |appears |would be )?(?:unlikely|not likely|improbable)"),
    # Post-negation: "not suspected", "pneumothorax is not seen", "the effusion has resolved".
    ("neg", "back", r"(?:(?:is|are|was|were) )?not (?:suspected|favou?red|considered|expected|felt|thought)(?: to be(?: present)?)?"),
    ("neg", "back", r"(?:(?:is|are|was|were|has|have|had|can|could|may)(?: be| been)? )?(?:not|no longer)(?: be)?(?: \w+)? (?:seen|identified|present|demonstrated|visuali[sz]ed|visible|evident|appreciated|noted|detected|depicted|observed|apparent|identifiable|shown|found|recogni[sz]ed|delineated|definable|re ?demonstrated|re ?identified)"),
    ("neg", "back", r"(?:is|are|was|were|has|have|had)(?: been)? (?:now )?(?:completely |fully |entirely |since )?(?:resolved|cleared|disappeared|gone|removed|absent|excluded|ruled out)|(?:is|are|was|were) (?:negative|none)"),
    # Historical: not a statement about this image.
    ("hist", "fwd", r"(?:past |prior |previous |known |remote )?(?:medical )?(?:history|hx) of|(?:being |was |were )?treated for|treatment (?:for|of)|(?:tubes?|catheters?|drains?|pigtails?|thoracostomy|thoracentesis|drainage)(?: \w+){0,2} for"),
    # Pre-negation.
    ("neg", "fwd", r"no|not|without|neither|nor|free of|clear of|negative for|absence of|lack of|lacks|(?:interval )?resolution of|disappearance of|fails? to (?:show|demonstrate|reveal)|no longer|rules out|excludes|excluding"),
    ("neg", "either", r"resolved|cleared|disappeared|gone|absent|excluded|ruled out"),
    # Uncertainty. A modal with "be present"-like words looks back ("effusion may be present");
    # a hedge followed by "represent"/"due to" covers only its object ("opacity may be due to
    # scarring" leaves the opacity certain).
    ("unc", "back", r"(?:may|might|could)(?: also| still| well)?(?: not)? (?:be|have been|exist|persist)(?: \w+)? (?:seen|identified|present|demonstrated|visuali[sz]ed|visible|evident|appreciated|noted|detected|depicted|observed|apparent|identifiable|shown|found|recogni[sz]ed|delineated|definable|re ?demonstrated|re ?identified|there)"),
    ("unc", "fwd", r"(?:(?:may|might|could|possibly|probably|likely|most likely|more likely|presumably|perhaps|conceivably)(?: also| well| still)? (?:be )?(?:represent\w*|reflect\w*|indicat\w*|relat\w*(?: to)?|due to|secondary to|attributable to|caused by|from|signify\w*|account\w*(?: for)?|correspond\w*(?: to)?))|(?:may|might|could)(?: also| well| still)?(?: be)?"),
    ("unc", "fwd", r"suspicio\w+ (?:for|of)|suggestive of|suggest(?:s|ing)?|concern(?:ing)? (?:for|of|about)|worr\w+ (?:for|of|about)|question of|possibility (?:of|for)|differential(?: diagnosis)?(?: (?:includes?|considerations?|of))?|rather than|as opposed to|versus|rule out|(?:to )?exclude|evaluat\w+ (?:for|of)|evaluate|assess\w* (?:for|of)|correlat\w+ for|consider|cannot be distinguished from|indistinguishable from|atypical for|favou?r(?:s|ing)?"),
    ("unc", "either", r"possible|possibly|probable|probably|(?:most |more |less )?likely|presum\w+|suspect\w*|suspicious|suggested|concerning|worrisome|question(?:able|ably|ed)?|query|borderline|equivocal|indeterminate|uncertain|not certain|considered|consideration|favou?red|potential(?:ly)?|perhaps|maybe|conceivabl[ye]|if (?:any|present)"),
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
_DISJUNCTIONS = _words("or nor")
_COORDINATORS = _words("and or nor plus")
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
        while i < clause_end and self.tokens[i] not in _SEPARATORS:
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
        if first in _CLAUSE_STARTERS or start in cue_starts:
            return True
        if self._has_own_verb(start, end):
            return True
        disjunct_after = any(t in _DISJUNCTIONS for t in self.tokens[start:clause_end])
        return first in _POSITIVE_MODIFIERS and not disjunct_after

    def forward_scope(self, cue: _Cue, cue_starts: set[int]) -> tuple[int, int]:
        if cue.end >= len(self.tokens):
            return cue.end, cue.end
        if self.clause_of[cue.end] == -1:
            return cue.end, cue.end
        _, clause_end = self.clause_bounds(cue.end)
        for i in range(cue.end, clause_end):
            if self.tokens[i] in _SEPARATORS and self._starts_clause(i, clause_end, cue_starts):
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
            if self.tokens[i] in _SEPARATORS:
                if self.tokens[i] in _COORDINATORS:
                    coordinated = True
                elif self.tokens[i] == "," and not coordinated:
                    break
                seg_start = i - 1
                while seg_start >= clause_start and self.tokens[seg_start] not in _SEPARATORS:
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
    for finding, pattern, unless_before in _MENTIONS_COMPILED:
        for match in pattern.finditer(text):
            if unless_before is not None and unless_before.search(text, 0, match.start()):
                continue
            start, end = sentence.span(match)
            if any(b_start <= start < b_end for b_start, b_end in blocked):
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
        base = {"normal": NEGATIVE, "borderline": UNCERTAIN, "enlarged": POSITIVE}[state]
        kind = term.lastgroup
        if kind == "heart":
            result.append(_Span("cardiomegaly", start, end, base))
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
    mentions: list[Mention] = []
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
            if cue.kind == "pseudo":
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
            elif "unc" in kinds or i in alternatives:
                label = UNCERTAIN
            else:
                label = span.base
            cue_text = tuple(c.text for c in decided[i]) + (
                ("or/versus",) if i in alternatives else ()
            )
            mentions.append(
                Mention(
                    finding=span.finding,
                    sentence=number,
                    start=span.start,
                    end=span.end,
                    text=" ".join(sentence.tokens[span.start : span.end]),
                    label=label,
                    cues=cue_text,
                )
            )
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
    for mention in find_mentions(text):
        by_finding.setdefault(mention.finding, []).append(mention.label)
    for finding in PATHOLOGIES:
        labels[finding] = aggregate(by_finding.get(finding, ()))
    pathologic = [aggregate(by_finding.get(name, ())) for name in PATHOLOGIES + _EXTRA]
    labels["no_finding"] = None if any(v in (POSITIVE, UNCERTAIN) for v in pathologic) else POSITIVE
    return labels


def to_states(labels: Mapping[str, int | None]) -> dict[str, str]:
    """Map 1/0/-1/None labels to "present"/"absent"/"uncertain"/"not_mentioned"."""
    return {name: STATE_NAMES[value] for name, value in labels.items()}


def label_report_states(text: str) -> dict[str, str]:
    """:func:`label_report` with the state names used by ``ReportResult.findings``."""
    return to_states(label_report(text))
