"""`mixlm eval --domains` says in its output what its nll/token measures, and how that differs from a run's
val_loss/<domain> (README: "Two held-out losses, measured differently")."""

from mixlm.eval.local_tasks import domains_markdown


def test_domains_table_says_what_nll_per_token_measures():
    row = {"documents": 3, "tokens": 120, "nll_per_token": 5.4326, "token_perplexity": 228.7, "bits_per_byte": 1.9}
    text = domains_markdown({"code": row})
    table, _, note = text.partition("\n\n")
    assert "| code | 3 | 120 | 5.4326 |" in table
    assert note.count("\n") == 1  # one line
    assert "every held-out document, each scored alone from its start" in note
    assert "val_loss/<domain>" in note and "eval.batches packed batches" in note
