"""The ``brand-training`` flow under the session's Prefect harness: the same training the CLI runs (a LoRA, an
embedding), registered with its record; a bad folder fails at once (an input problem is not retried)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import select

from engine.checkpoint import file_sha256
from engine.random_checkpoint import write_random
from storage.database import open_database, sqlite_url
from storage.schema import ModelRecord

pytestmark = pytest.mark.usefixtures("campaign_caches")


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).resize((64, 80), Image.Resampling.NEAREST).save(folder / f"p{i}.png")
    return folder


def test_train_adapter_flow_trains_and_registers(tmp_path: Path) -> None:
    from prefect.states import State

    from flows.training import train_adapter

    base = write_random(tmp_path / "base.safetensors", "sd1", "tiny", seed=5, metadata={"modelspec.license": "Apache-2.0"})
    images = _photos(tmp_path / "acme")
    db = sqlite_url(tmp_path / "adforge.db")
    out = tmp_path / "loras" / "acme.safetensors"
    result = train_adapter(kind="lora", images=str(images), trigger="acme", class_word="bottle", out=str(out), model=base,
                           settings={"steps": 2, "save_every": 1, "rank": 2, "resolution": 64}, device="cpu", db_url=db)
    assert result["out"] == str(out) and result["sha256"] == file_sha256(out) and result["steps"] == 2
    assert result["licence"] == "apache-2.0" and result["commercial_use"] is True
    database = open_database(db)
    try:
        with database.session() as s:
            row = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == result["sha256"]))
            assert row.kind == "lora" and json.loads(row.training)["images"] == 2
    finally:
        database.dispose()

    # A bad folder is an input problem: the flow fails once, without the task's retries.
    state = train_adapter(kind="lora", images=str(tmp_path / "missing"), trigger="acme", class_word="bottle",
                          out=str(tmp_path / "x.safetensors"), model=base, settings={"steps": 2}, db_url=db,
                          return_state=True)
    assert isinstance(state, State) and state.is_failed()
    with pytest.raises(ValueError, match="not a folder"):
        state.result()


def test_train_adapter_flow_trains_an_embedding(tmp_path: Path) -> None:
    from flows.training import train_adapter

    base = write_random(tmp_path / "base.safetensors", "sd1", "tiny", seed=5, metadata={"modelspec.license": "Apache-2.0"})
    out = tmp_path / "embeddings" / "acme-bottle.pt"
    result = train_adapter(kind="embedding", images=str(_photos(tmp_path / "acme")), trigger="acme", class_word="bottle",
                           out=str(out), model=base, settings={"steps": 2, "save_every": 1, "vectors": 1, "resolution": 64},
                           device="cpu", db_url=sqlite_url(tmp_path / "adforge.db"))
    assert result["kind"] == "embedding" and result["sha256"] == file_sha256(out) and result["licence"] == "apache-2.0"
    assert result["record"]["token"] == "acme-bottle" and result["record"]["trainer"] == "embedding"


def test_the_brand_training_deployment_names_the_flow() -> None:
    import yaml
    from prefect.utilities.callables import parameter_schema

    from flows.training import train_adapter

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "brand-training"]
    assert deployment["entrypoint"] == "flows/training.py:train_adapter" and deployment["work_pool"]["name"] == "adforge"
    assert deployment["enforce_parameter_schema"] is True
    schema = parameter_schema(train_adapter.fn)
    assert set(schema.required) == {"kind", "images", "trigger", "class_word", "out"}
