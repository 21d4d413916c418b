"""Test helper: documents of random words over a small alphabet (one domain per alphabet), for tests that
prepare their own tiny domains."""


def alphabet_docs(alphabet: str, n: int, rng, *, word_len: tuple[int, int] = (1, 6),
                  words: tuple[int, int] = (2, 40)) -> list[str]:
    """n documents; each has rng.integers(*words) words of rng.integers(*word_len) letters drawn from
    `alphabet` (numpy Generator `rng`, so a seed gives the same corpus)."""
    return [
        " ".join("".join(rng.choice(list(alphabet), size=int(rng.integers(*word_len))))
                 for _ in range(int(rng.integers(*words))))
        for _ in range(n)
    ]


def write_manifest(domain_dir, train_tokens: int, validation_tokens: int = 0) -> None:
    """A prepared domain's manifest.json holding only token counts (no shards): enough for what reads counts
    (token priors, fidelity), as mixlm.data.prepared.DomainManifest writes it."""
    from mixlm.data.prepared import DomainManifest, SplitInfo

    domain_dir.mkdir(parents=True, exist_ok=True)
    manifest = DomainManifest(domain=domain_dir.name, dtype="uint16", tokenizer={}, seed=0, sources=[], malformed={},
                              options={}, splits={"train": SplitInfo(tokens=train_tokens),
                                                  "validation": SplitInfo(tokens=validation_tokens)})
    (domain_dir / "manifest.json").write_text(manifest.to_json())
