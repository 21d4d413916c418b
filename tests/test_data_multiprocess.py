"""Two real `jax.distributed` processes on localhost build the same global batches as one process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import xla_flags
from ports import free_port

from mixlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from mixlm.data import make_train_source
from mixlm.data.demo_corpus import prepare_demo_data

STEPS = 4

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from mixlm.config import config_from_dict
    from mixlm.data import make_train_source

    pid, port, cfg_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    cfg = config_from_dict(json.load(open(cfg_path)))
    source = make_train_source(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    gathered = {}
    for step in range(int(sys.argv[5])):
        for key, local in source.next_batch().items():
            global_array = jax.make_array_from_process_local_data(sharding, local)
            want = (cfg.train.global_batch_size,) + (() if key == "domain_ids" else (cfg.data.seq_len,))
            assert global_array.shape == want, (key, global_array.shape)
            gathered[f"{step}/{key}"] = np.asarray(multihost_utils.process_allgather(global_array, tiled=True))
    if pid == 0:
        np.savez(f"{out}/batches.npz", **gathered)
    json.dump({"state": source.get_state(), "tokens": source.tokens_seen(), "devices": jax.device_count()},
              open(f"{out}/state{pid}.json", "w"))
    source.close()
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_two_processes_build_the_same_global_batches(tmp_path):
    paths = prepare_demo_data(tmp_path / "demo", docs_per_domain=150, vocab_size=300)
    cfg = ExperimentConfig(
        model=ModelConfig(vocab_size=300),
        data=DataConfig(
            source="prepared",
            prepared_dir=str(paths["prepared"]),
            seq_len=24,
            packing="first_fit",
            mixture={
                "weights": {"arithmetic": 0.4, "code": 0.3, "prose": 0.3},
                "stages": [{"step": 2, "weights": {"records": 0.5, "prose": 0.5}}],
            },
        ),
        train=TrainConfig(global_batch_size=16),
    )
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(4),
        PYTHONPATH=os.getcwd(),
    )
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                str(i),
                port,
                str(cfg_path),
                str(tmp_path),
                str(STEPS),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    reference = make_train_source(cfg, process_index=0, process_count=1)
    gathered = np.load(tmp_path / "batches.npz")
    for step in range(STEPS):
        batch = reference.next_batch()
        assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions", "domain_ids"}
        for key, value in batch.items():
            np.testing.assert_array_equal(gathered[f"{step}/{key}"], value, err_msg=f"step {step} {key}")
    for pid in range(2):
        got = json.loads((tmp_path / f"state{pid}.json").read_text())
        assert got["devices"] == 8
        assert got["state"] == reference.get_state() and got["tokens"] == reference.tokens_seen()
    reference.close()
