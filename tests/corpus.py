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
