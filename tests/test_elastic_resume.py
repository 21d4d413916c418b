"""Elastic resume: a run of 2 jax.distributed processes (4 fake devices each) stopped and checkpointed at step 4
resumes exactly on 1 process (4 devices) and on 4 processes (2 devices each): the next 20 global batches are
bitwise those of the uninterrupted run (1 process, 8 devices; the 2-process run matches it up to its stop) and
the losses match it, with first-fit packing, a `set_weights` mixture update before the checkpoint and a
configured stage change after it. Then the data sources alone (both packings and the synthetic source) saved at
2 processes and resumed on 1, 4 and 8, and the one thing that cannot change: a global batch the new process
count does not divide."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from corpus import alphabet_docs
from elastic_worker import run_job
from ports import launch

from mixlm.config import load_config
from mixlm.data import make_train_source
from mixlm.data.prepare import PrepareOptions, prepare_domains
from mixlm.data.tokenizer import train_tokenizer_from_texts
from mixlm.errors import ConfigError

VOCAB = 256  # the tokenizer trainer adds specials: 258 tokens
MODEL_VOCAB = 264
STOP_AT = 4  # the 2-process run stops after this step, which it checkpoints
RESUMED = 20  # steps after the checkpoint
STEPS = STOP_AT + RESUMED
UPDATE = [2, {"alpha": 0.2, "digits": 0.5, "upper": 0.3}]  # set_weights after step 2: before the checkpoint
STAGE_AT = 12  # a configured stage change: after the checkpoint
WORKER = Path(__file__).with_name("elastic_worker.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("elastic_data")
    rng = np.random.default_rng(0)
    texts = {
        name: alphabet_docs(alphabet, 120, rng, words=(2, 30))
        for name, alphabet in {"alpha": "abcdefgh", "digits": "0123456789", "upper": "ABCDEFGH"}.items()
    }
    sources = {}
    for name, docs in texts.items():
        sources[name] = str(root / f"{name}.jsonl")
        Path(sources[name]).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer_from_texts(
        [t for docs in texts.values() for t in docs], root / "tok", vocab_size=VOCAB
    )
    prepare_domains(
        sources,
        root / "prepared",
        PrepareOptions(tokenizer=str(tok), validation_docs=4, shard_tokens=2000, progress=False),
    )
    return str(root / "prepared")


def elastic_cfg(prepared: str, out_dir, packing: str = "first_fit", *overrides):
    mixture = {
        "weights": {"alpha": 0.5, "digits": 0.3, "upper": 0.2},
        "stages": [{"step": STAGE_AT, "weights": {"alpha": 0.1, "digits": 0.1, "upper": 0.8}}],
    }
    return load_config(
        None,
        [
            "model.family=llama",
            "model.num_layers=1",
            "model.d_model=32",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.mlp_dim=64",
            "model.attention=xla",
            f"model.vocab_size={MODEL_VOCAB}",
            "model.max_seq_len=16",
            "model.vocab_multiple=8",
            "data.source=prepared",
            f"data.prepared_dir={prepared}",
            f"data.packing={packing}",
            f"data.mixture={json.dumps(mixture)}",
            "data.seq_len=16",
            "data.seed=3",
            "train.global_batch_size=8",
            f"train.steps={STEPS}",
            f"train.output_dir={out_dir}",
            "optimizer.lr=1e-2",
            "optimizer.eps=1e-3",
            "schedule.kind=cosine",
            "schedule.warmup_steps=3",
            "eval.batches=0",
            "checkpoint.save_at_end=false",
            "logging.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.peak_flops=1e9",
            *overrides,
        ],
    )


def job(cfg, out: Path, *, stop_at: int | None = None, devices: int | None = None) -> dict:
    return {
        "config": cfg.to_dict(),
        "stop_at": stop_at,
        "update": UPDATE,
        "devices": devices,
        "out": str(out),
    }


def start_processes(tmp_path: Path, name: str, the_job: dict, processes: int):
    """Starts `processes` jax.distributed processes on localhost (8 // processes fake devices each); returns
    a function that waits for them and returns process 0's record."""
    job_file = tmp_path / f"{name}.json"
    job_file.write_text(json.dumps(the_job))
    wait_all = launch(tmp_path / f"{name}.logs", lambda i, port: [
        sys.executable, str(WORKER), str(i), str(processes), port, str(job_file)], processes)

    def wait() -> dict:
        wait_all()
        return json.loads(Path(the_job["out"]).read_text())

    return wait


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """The uninterrupted reference (1 process x 8 devices, in this process while the 2-process run goes), the
    2-process run stopped after STOP_AT, and its checkpoint resumed on 1 process x 4 devices (in this process)
    and on 4 processes x 2 devices (at the same time)."""
    tmp = tmp_path_factory.mktemp("elastic_runs")
    two = tmp / "two"
    wait_two = start_processes(
        tmp, "two", job(elastic_cfg(prepared, two), tmp / "two.json", stop_at=STOP_AT), 2
    )
    try:
        out = {"reference": run_job(job(elastic_cfg(prepared, tmp / "reference"), tmp / "reference.json"))}
    finally:
        out_two = wait_two()  # also when the in-process run failed: never leave the processes behind
    out["two"] = out_two
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [str(STOP_AT)]  # the only checkpoint
    out["checkpoint"] = two / "checkpoints" / str(STOP_AT)
    for name in ("one", "four"):
        shutil.copytree(two, tmp / name)
    wait_four = start_processes(tmp, "four", job(elastic_cfg(prepared, tmp / "four"), tmp / "four.json"), 4)
    try:
        out["one"] = run_job(job(elastic_cfg(prepared, tmp / "one"), tmp / "one.json", devices=4))
    finally:
        out_four = wait_four()
    out["four"] = out_four
    return out


def steps(first: int, last: int) -> list[str]:
    return [str(s) for s in range(first, last + 1)]


@pytest.mark.slow
def test_the_two_process_run_and_its_checkpoint(runs):
    ref, two = runs["reference"], runs["two"]
    assert (two["process_count"], two["device_count"], two["start_step"]) == (2, 8, 0)
    assert list(two["batches"]) == list(two["losses"]) == steps(1, STOP_AT)
    for s in steps(1, STOP_AT):  # the 2-process run is the 1-process run, up to its stop
        assert two["batches"][s] == ref["batches"][s], f"global batch of step {s} differs"
        assert two["losses"][s] == pytest.approx(ref["losses"][s], rel=1e-5), s
    step_dir = runs["checkpoint"]  # arrays from both processes; the one data state from process 0
    assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    saved = json.loads((step_dir / "data" / "metadata").read_text())
    assert saved["step"] == STOP_AT and saved["mixture_updates"] == [UPDATE]  # the update at step 2 is in it
    assert set(saved["anchors"]) == set(UPDATE[1])  # first-fit cursors of every domain
    assert saved == two["data_state"]  # what the source said when the run stopped


@pytest.mark.slow
@pytest.mark.parametrize("name, processes, devices", [("one", 1, 4), ("four", 4, 8)])
def test_resume_on_another_process_count_gives_the_same_batches_and_losses(runs, name, processes, devices):
    ref, got = runs["reference"], runs[name]
    assert (got["process_count"], got["device_count"], got["start_step"]) == (processes, devices, STOP_AT)
    assert list(got["batches"]) == steps(STOP_AT + 1, STEPS)  # RESUMED steps, across the stage change
    for s in steps(STOP_AT + 1, STEPS):
        assert got["batches"][s] == ref["batches"][s], f"global batch of step {s} differs"
        assert got["losses"][s] == pytest.approx(ref["losses"][s], rel=1e-5), s
    assert got["data_state"] == ref["data_state"]
    assert any(
        line.startswith(f"elastic resume: checkpoint step {STOP_AT} was saved by 2 processes")
        for line in got["log"]
    ), got["log"]
    assert not any(line.startswith("elastic resume") for line in ref["log"] + runs["two"]["log"])


# ---- the data sources alone: a state saved at 2 processes, resumed on 1, 4 and 8 (cheap, no jax) ---------

DATA_STEPS, DATA_STOP_AT, DATA_UPDATE_AT = 10, 4, 2


def data_sources(cfg, processes: int) -> list:
    return [make_train_source(cfg, process_index=p, process_count=processes) for p in range(processes)]


def global_batch(sources) -> dict:
    """The next global batch: the hosts' rows in process order."""
    parts = [s.next_batch() for s in sources]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("packing", ["concat", "first_fit", "synthetic"])
def test_a_data_state_saved_at_2_processes_resumes_on_1_4_and_8(prepared, tmp_path, packing):
    # The stage starts at step 6 and the mixture update is at step 2: the state at step 4 sits between them.
    cfg = elastic_cfg(
        prepared, tmp_path, "concat" if packing == "synthetic" else packing, f"train.steps={DATA_STEPS}"
    )
    mixture = {
        "weights": {"alpha": 0.5, "digits": 0.3, "upper": 0.2},
        "stages": [{"step": 6, "weights": {"upper": 1}}],
    }
    data = dataclasses.replace(
        cfg.data, mixture=mixture, source="synthetic" if packing == "synthetic" else "prepared"
    )
    cfg = dataclasses.replace(cfg, data=data)
    mixing = packing != "synthetic"

    def run(sources, first: int, last: int) -> list[dict]:
        out = []
        for step in range(first, last):
            if mixing and step == DATA_UPDATE_AT:
                for s in sources:
                    s.set_weights(UPDATE[1])
            out.append(global_batch(sources))
        return out

    (reference,) = data_sources(cfg, 1)
    want = run([reference], 0, DATA_STEPS)
    two = data_sources(cfg, 2)
    run(two, 0, DATA_STOP_AT)
    saved = two[0].get_state()
    assert two[1].get_state() == saved  # global: process 0's copy is the checkpoint's
    if mixing:
        assert saved["mixture_updates"] == [[DATA_UPDATE_AT, UPDATE[1]]]
        assert ("anchors" in saved) == (packing == "first_fit")
    for processes in (1, 4, 8):
        resumed = data_sources(cfg, processes)
        for s in resumed:
            s.set_state(json.loads(json.dumps(saved)))  # through JSON, as the checkpoint stores it
        got = run(resumed, DATA_STOP_AT, DATA_STEPS)
        for step, (a, b) in enumerate(zip(got, want[DATA_STOP_AT:]), start=DATA_STOP_AT):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(
                    a[key], b[key], err_msg=f"{processes} processes, step {step}, {key}"
                )
        assert all(s.get_state() == reference.get_state() for s in resumed)
        assert all(s.tokens_seen() == reference.tokens_seen() for s in resumed)
        for s in resumed:
            s.close()
    for s in [reference, *two]:
        s.close()


def test_a_global_batch_the_new_process_count_does_not_divide_is_refused(prepared, tmp_path):
    from mixlm.config import validate_for_mesh
    from mixlm.data.pipeline import PreparedMixtureSource

    cfg = elastic_cfg(prepared, tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^train.global_batch_size=8 does not split over 3 processes; run on a "
        r"process count that divides it \(e.g. 2 or 4\)",
    ):
        PreparedMixtureSource(cfg, process_index=0, process_count=3, verbose=False)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        make_train_source(cfg, process_index=0, process_count=3)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        validate_for_mesh(cfg, 1, 3)  # what train() checks before building anything
    with pytest.raises(ConfigError, match=r"process_index=4 of process_count=4"):
        PreparedMixtureSource(cfg, process_index=4, process_count=4, verbose=False)
