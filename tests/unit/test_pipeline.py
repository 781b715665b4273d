from budwood.pipeline import _score


def test_demo_score_counts_exact_answers_and_abstentions():
    rows = [
        {"answerable": True, "reference": "It costs 5 pounds.", "base": "no idea", "adapted": "it costs 5 pounds"},
        {"answerable": True, "reference": "It opens at 9.", "base": "It opens at 9.", "adapted": "It opens at 8."},
        {"answerable": False, "reference": None, "base": "Blue.", "adapted": "I don't know; not in my data."},
    ]
    assert _score(rows, "adapted") == {"exact": 0.5, "abstained": 1.0}
    assert _score(rows, "base") == {"exact": 0.5, "abstained": 0.0}
