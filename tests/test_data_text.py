"""The CTC text side: normaliser, character vocabulary (transformers layout), unknown characters."""

from __future__ import annotations

import json

import pytest

from speech_ssl.data import TextConfig, TextNormalizer, Vocabulary
from speech_ssl.errors import SpeechSSLError

TEXTS = ["THE CAT'S HAT", "a dog  sat", "Zebra"]


def test_normaliser_is_explicit_and_configurable():
    norm = TextNormalizer()
    assert norm("  the   cat's hat ") == "THE CAT'S HAT"
    assert norm("ﬁne") == "FINE"  # NFKC folds the ligature
    custom = TextNormalizer(TextConfig(uppercase=False, char_map={"-": " "}, remove=",.", keep="'"))
    assert custom("well-known, isn't it.") == "well known isn't it"
    with pytest.raises(SpeechSSLError) as info:
        norm("HELLO, WORLD 42")
    message = str(info.value)
    assert "','" in message and "'4'" in message and "'2'" in message and "data.text.char_map" in message
    assert TextNormalizer(TextConfig(unknown="drop"))("HELLO, WORLD 42") == "HELLO WORLD"


def test_normaliser_check_lists_every_bad_character_of_a_corpus():
    with pytest.raises(SpeechSSLError) as info:
        TextNormalizer().check(["OK", "NO, WAY", "WHY?", None, "A-B"])
    message = str(info.value)
    for ch in (",", "?", "-"):
        assert repr(ch) in message


def test_vocabulary_layout_and_round_trip(tmp_path):
    norm = TextNormalizer()
    vocab = Vocabulary.build(TEXTS, norm)
    assert vocab.tokens[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    assert vocab.tokens[5:] == sorted(set("".join(norm(t) for t in TEXTS)) - {" "})
    assert vocab.blank_id == 0 and vocab.word_delimiter_id == 4
    for text in TEXTS:
        ids = vocab.encode(norm(text))
        assert vocab.decode(ids) == norm(text)
        assert ids.count(4) == norm(text).count(" ")
    vocab.save(tmp_path)
    saved = json.load(open(tmp_path / "vocab.json"))
    assert saved == {t: i for i, t in enumerate(vocab.tokens)}
    assert Vocabulary.load(tmp_path) == vocab and len(Vocabulary.load(tmp_path)) == len(vocab)


def test_greedy_ctc_decoding_collapses_repeats_and_blanks():
    vocab = Vocabulary.build(["AB"])
    a, b = vocab.index["A"], vocab.index["B"]
    assert vocab.decode_ctc([0, a, a, 0, a, b, b, 4, 4, b, 0]) == "AAB B"


def test_decoding_spells_tokens_as_transformers_does():
    """<unk>/<s>/</s> frames are written out (they separate repeats), boundaries at the ends are stripped,
    two boundaries with a blank between them stay two spaces: Wav2Vec2CTCTokenizer's rules."""
    vocab = Vocabulary.build(["AB"])
    a, b, unk, bos, eos, word = (vocab.index[t] for t in ("A", "B", "<unk>", "<s>", "</s>", "|"))
    assert vocab.decode_ctc([a, unk, unk, a]) == "A<unk>A"
    assert vocab.decode_ctc([word, a, word, 0, word, b, word]) == "A  B"
    assert vocab.decode_ctc([bos, a, eos]) == "<s>A</s>"
    assert vocab.decode_ctc([0, 0]) == ""


def test_unknown_characters_are_an_error_listing_them_or_dropped():
    vocab = Vocabulary.build(["ABC"])
    with pytest.raises(SpeechSSLError) as info:
        vocab.encode("ABZ Q")
    assert "'Z'" in str(info.value) and "'Q'" in str(info.value)
    with pytest.raises(SpeechSSLError, match="'X'"):
        vocab.check(["AB", "XA"])
    dropping = Vocabulary(vocab.tokens, unknown="drop")
    assert dropping.decode(dropping.encode("ABZ C")) == "AB C"


def test_transformers_tokenizer_reads_our_vocab(tmp_path):
    transformers = pytest.importorskip("transformers")
    norm = TextNormalizer()
    vocab = Vocabulary.build(TEXTS, norm)
    vocab.save(tmp_path)
    tok = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    for text in TEXTS:
        assert tok(norm(text)).input_ids == vocab.encode(norm(text))
    assert tok.pad_token_id == vocab.blank_id
