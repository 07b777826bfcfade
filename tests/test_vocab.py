from captioner.vocab import END, PAD, START, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A man's T-shirt, blue!") == ["a", "man's", "t-shirt", "blue"]
    assert tokenize("  ") == []


def test_build_threshold_order_and_specials() -> None:
    v = Vocabulary.build(["a dog", "a cat", "a dog runs"], min_count=2)
    assert v.itos[:4] == [PAD, START, END, UNK]
    assert v.itos[4:] == ["a", "dog"]
    ids = v.encode("A dog runs")
    assert ids == [v.start_id, v.stoi["a"], v.stoi["dog"], v.unk_id, v.end_id]
    assert v.decode([*ids, v.pad_id]) == ["a", "dog", UNK]
    assert v.encode("a dog a dog", max_len=2)[-1] == v.end_id


def test_json_round_trip(tmp_path) -> None:
    v = Vocabulary.build(["x y z", "x y"], min_count=1)
    v.save(tmp_path / "v.json")
    w = Vocabulary.load(tmp_path / "v.json")
    assert w.itos == v.itos and w.stoi == v.stoi


def test_build_orders_by_frequency_then_alphabet() -> None:
    v = Vocabulary.build(["zebra zebra zebra", "apple zebra", "mango apple", "kiwi"], min_count=1)
    assert v.itos[4:] == ["zebra", "apple", "kiwi", "mango"]  # 4, 2, then the ties 1, 1 alphabetically
    assert Vocabulary.build(["zebra zebra zebra", "apple zebra", "mango apple", "kiwi"], min_count=3).itos[4:] == [
        "zebra"
    ]
