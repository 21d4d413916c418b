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


SENTENCES = [f"the {a} {b} sat on the {c} mat." for a in ("red", "big", "old", "shy") for b in ("cat", "dog", "owl")
             for c in ("warm", "flat")]
NOISE_CHARS = list("qwxzjkvbpymlfghtdnrsaeiou ")


def learnable_and_noise_docs(rng, n: int = 200) -> dict[str, list[str]]:
    """Three domains of n documents: `counting` (runs of consecutive numbers) and `phrases` (sentences of a
    24-sentence grammar), which a model learns to predict ever better, and `noise` (uniformly random characters),
    whose loss can never fall below its entropy."""
    counting = []
    for _ in range(n):
        first, length = int(rng.integers(0, 50)), int(rng.integers(10, 40))
        counting.append(" ".join(str(i) for i in range(first, first + length)))
    phrases = [" ".join(rng.choice(SENTENCES, size=int(rng.integers(3, 12)))) for _ in range(n)]
    noise = ["".join(rng.choice(NOISE_CHARS, size=int(rng.integers(40, 160)))) for _ in range(n)]
    return {"counting": counting, "phrases": phrases, "noise": noise}
