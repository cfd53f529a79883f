"""Prompt rendering and tokenization reproduce the reference's quirks (spec §2.2-2.3)."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from model.chat import IMAGE_TOKEN_INDEX, Message, render_llama2, tokenize_with_image
from model.prompts import REPORT, SYSTEM, PromptConfig
from model.tokenizer import LlamaTokenizer

SPEC_PROMPT = (
    "<s>[INST] <<SYS>>\nYou are a helpful radiologist. Try to interpret chest x ray image and "
    "answer to the question that user provides.\n<</SYS>>\n\n<image>\nWrite a radiologic report "
    "on the given chest radiograph, including information about atelectasis, cardiomegaly, "
    "consolidation, pulmonary edema, pleural effusion, and pneumothorax. [/INST]"
)


def report_chat() -> list[Message]:
    first, _ = PromptConfig().report_message(age_years=None)
    return [Message("system", SYSTEM), Message("user", first)]


@pytest.fixture(scope="module")
def proto(tiny_dir) -> bytes:
    return (tiny_dir / "tokenizer.model").read_bytes()


def test_single_turn_prompt_renders_to_the_spec_string() -> None:
    assert render_llama2(report_chat()) == SPEC_PROMPT


def test_prompt_ids_start_with_two_bos_and_splice_one_image_sentinel(proto) -> None:
    tok = LlamaTokenizer(proto, legacy=True)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    head, tail = SPEC_PROMPT.split("<image>")
    # spec §2.3: BOS added by the call + the literal "<s>" parsed as BOS, then the rest of
    # chunk 0, one sentinel, then chunk 1 with its BOS stripped.
    expected = [1, 1] + sp.encode(head.removeprefix("<s>")) + [IMAGE_TOKEN_INDEX] + sp.encode(tail)
    ids = tokenize_with_image(SPEC_PROMPT, tok)
    assert ids == expected
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids.index(IMAGE_TOKEN_INDEX) == len(tok.encode(head))


def test_legacy_false_encodes_text_after_a_special_token_without_the_dummy_prefix(proto) -> None:
    new = LlamaTokenizer(proto, legacy=False)
    old = LlamaTokenizer(proto, legacy=True)
    assert [new.id_to_token(i) for i in new.encode("<s>[INST]")[:3]] == ["<s>", "<s>", "["]
    assert [old.id_to_token(i) for i in old.encode("<s>[INST]")[:3]] == ["<s>", "<s>", "\u2581["]
    # Plain text still gets its leading "▁" in both modes.
    assert new.encode("The heart") == old.encode("The heart")


def test_tokenizer_options_are_read_from_tokenizer_config(tiny_dir, tmp_path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert LlamaTokenizer.from_dir(tmp_path).legacy is cfg["legacy"] is False
    del cfg["legacy"], cfg["clean_up_tokenization_spaces"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = LlamaTokenizer.from_dir(tmp_path)
    assert tok.legacy is True  # transformers 4.36's default when the file is silent
    assert tok.clean_up_tokenization_spaces is True
    ids = tok.encode("The lungs are clear .", add_special_tokens=False)
    assert tok.decode(ids) == "The lungs are clear."


def test_streamed_answer_restarts_decoding_after_each_newline(proto) -> None:
    tok = LlamaTokenizer(proto, legacy=False, clean_up_tokenization_spaces=False)
    ids = tok.encode("The heart is normal.\n The lungs are clear.", add_special_tokens=False)
    assert tok.decode(ids) == "The heart is normal.\n The lungs are clear."
    # TextIteratorStreamer empties its cache at "\n"; the next segment loses its leading space.
    assert tok.stream_decode(ids) == "The heart is normal.\nThe lungs are clear."
    assert tok.stream_decode(ids + [tok.eos_token_id]) == tok.stream_decode(ids)


def test_special_tokens_written_in_text_map_to_their_ids(proto) -> None:
    tok = LlamaTokenizer(proto)
    ids = tok.encode(" normal. </s><s>[INST] Next", add_special_tokens=False)
    assert tok.eos_token_id in ids and tok.bos_token_id in ids
    assert ids.index(tok.bos_token_id) == ids.index(tok.eos_token_id) + 1
    assert tok.decode(ids) == tok.decode([i for i in ids if i not in (1, 2)])


def test_ids_outside_the_sentencepiece_vocabulary_decode_to_nothing(proto) -> None:
    tok = LlamaTokenizer(proto)
    ids = tok.encode("Clear lungs", add_special_tokens=False)
    assert tok.decode(ids + [tok.vocab_size + 5]) == tok.decode(ids)


def test_follow_up_turns_append_answer_eos_and_a_new_bos_turn_with_no_second_image(proto) -> None:
    tok = LlamaTokenizer(proto)
    chat = report_chat() + [
        Message("assistant", " The heart is normal.\n"),
        Message("user", "What are the possible differential diagnoses for this patient?\n"),
    ]
    text = render_llama2(chat)
    assert text.startswith(SPEC_PROMPT + " The heart is normal. </s><s>[INST] What are")
    assert text.endswith("for this patient? [/INST]")
    ids = tokenize_with_image(text, tok)
    first = tokenize_with_image(SPEC_PROMPT, tok)
    assert ids[: len(first)] == first
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    eos = ids.index(tok.eos_token_id)
    assert ids[eos + 1] == tok.bos_token_id


def test_roles_must_alternate() -> None:
    with pytest.raises(ValueError, match="alternate"):
        render_llama2([Message("system", "s"), Message("assistant", "a")])


def test_paediatric_patients_get_the_heart_size_caution_in_the_report_prompt() -> None:
    prompts = PromptConfig()
    child, variant = prompts.report_message(age_years=6.5)
    adult, adult_variant = prompts.report_message(age_years=40)
    unknown, unknown_variant = prompts.report_message(age_years=None)
    assert (variant, adult_variant, unknown_variant) == ("paediatric", "default", "default")
    assert adult == unknown == "<image>\n" + REPORT
    assert child.startswith("<image>\n" + REPORT.strip()) and "heart can look large" in child
    off, off_variant = PromptConfig(paediatric_age=None).report_message(age_years=6.5)
    assert off_variant == "default" and off == adult
