"""``adforge train lora|embedding|dreambooth``: bad folders and bad embedding names refused before anything happens;
a few steps on a tiny random model write a LoRA, an embedding (.pt and .safetensors) or a checkpoint that is
registered with its training record and its base's licence, samples at the asked steps, a re-run does nothing more,
a killed run resumes, a non-commercial base gives a non-commercial LoRA, and a DreamBooth output renders as a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from sqlalchemy import select
from typer.testing import CliRunner

from cli.app import app
from engine.checkpoint import file_sha256
from engine.random_checkpoint import write_random
from storage.database import open_database, sqlite_url
from storage.image_metadata import parse_infotext, read_png_metadata
from storage.schema import ModelRecord

runner = CliRunner()
FAST = ["--steps", "4", "--save-every", "2", "--rank", "2", "--resolution", "64", "--device", "cpu", "--seed", "1"]


def _photos(folder: Path, n: int = 3, size: tuple[int, int] = (96, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(len(str(folder)))
    for i in range(n):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST).save(folder / f"shot{i}.png")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_random(tmp_path_factory.mktemp("base") / "base.safetensors", "sd1", "tiny", seed=2,
                             metadata={"modelspec.title": "base", "modelspec.license": "CreativeML-OpenRAIL-M"}))


def _train(images: Path, out: Path, model: Path, db: str, *extra: str):
    return runner.invoke(app, ["train", "lora", "--images", str(images), "--trigger", "zwx", "--class-word", "bottle",
                               "--model", str(model), "--out", str(out), "--db", db, *FAST, *extra], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train")
    db = sqlite_url(root / "adforge.db")
    images = _photos(root / "acme")
    (images / "shot0.txt").write_text("zwx bottle, on a table")
    out = root / "loras" / "zwx.safetensors"
    res = _train(images, out, base, db, "--sample-every", "2", "--sample-steps", "2")
    return {"root": root, "db": db, "images": images, "out": out, "res": res}


def _row(db: str, sha: str) -> ModelRecord:
    database = open_database(db)
    try:
        with database.session() as s:
            row = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == sha))
            s.expunge_all()
            return row
    finally:
        database.dispose()


def test_bad_folders_are_refused_naming_each_file_before_training(base: Path, tmp_path: Path) -> None:
    db_file = tmp_path / "adforge.db"
    out = tmp_path / "loras" / "x.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _train(empty, out, base, sqlite_url(db_file))
    assert res.exit_code == 2 and "no images" in res.output

    bad = _photos(tmp_path / "bad", n=1)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (32, 32)).save(bad / "tiny.png")
    (bad / "shot0.txt").write_text("a bottle on a table")
    res = _train(bad, out, base, sqlite_url(db_file))
    assert res.exit_code == 2, res.output
    for name in ("broken.png", "tiny.png", "shot0.txt"):
        assert name in res.output
    assert "too small" in res.output and "does not mention the trigger" in res.output and "nothing was trained" in res.output
    assert not out.exists() and not out.parent.exists() and not db_file.exists()


def test_a_few_steps_write_register_and_sample(trained: dict, base: Path) -> None:
    res, out = trained["res"], trained["out"]
    assert res.exit_code == 0, res.output
    sha = file_sha256(out)
    assert f"sha256:  {sha}" in res.output and "registered LoRA zwx" in res.output
    assert not list(out.parent.glob("*.part"))
    row = _row(trained["db"], sha)
    assert (row.kind, row.family, row.license, row.commercial_use, row.license_source) == (
        "lora", "sd1", "creativeml-openrail-m", True, "inherited")
    record = json.loads(row.training)
    assert record["trainer"] == "lora" and record["images"] == 3 and record["steps"] == 4
    assert (record["trigger"], record["class_word"]) == ("zwx", "bottle")
    assert record["base_model"]["sha256"] == file_sha256(base) and record["base_model"]["name"] == "base"
    assert record["settings"]["rank"] == 2 and record["settings"]["resolution"] == 64 and len(record["image_set_sha256"]) == 64
    assert record["started_at"] <= record["finished_at"] and record["seconds"] > 0

    samples = sorted(p.name for p in (out.parent / ".train-zwx" / "samples").glob("*.png"))
    assert samples == ["step-000002-0.png", "step-000002-1.png", "step-000004-0.png", "step-000004-1.png"]
    prompt, _, params = parse_infotext(read_png_metadata(out.parent / ".train-zwx" / "samples" / "step-000004-0.png")[0])
    assert prompt == "zwx bottle" and params["Training step"] == "4" and params["Training"] == "zwx"
    assert parse_infotext(read_png_metadata(out.parent / ".train-zwx" / "samples" / "step-000002-1.png")[0])[0] == "bottle"


def test_inspect_and_list_show_the_training_record(trained: dict) -> None:
    res = runner.invoke(app, ["models", "inspect", str(trained["out"]), "--db", trained["db"]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "kohya LoRA for SD 1.x" in res.output and "trained:     lora on 3 images" in res.output
    res = runner.invoke(app, ["models", "list", "--db", trained["db"]], catch_exceptions=False)
    assert "[lora]" in res.output and "trained: lora on 3 images" in res.output and "trigger 'zwx'" in res.output


def test_a_second_run_with_the_same_arguments_does_nothing_more(trained: dict, base: Path) -> None:
    out = trained["out"]
    before = (file_sha256(out), out.stat().st_mtime_ns)
    res = _train(trained["images"], out, base, trained["db"], "--sample-every", "2", "--sample-steps", "2")
    assert res.exit_code == 0, res.output
    assert "nothing to train" in res.output and (file_sha256(out), out.stat().st_mtime_ns) == before
    # Another training may not overwrite it.
    res = _train(trained["images"], out, base, trained["db"], "--seed", "9")
    assert res.exit_code == 2 and "not the result of this training" in res.output
    assert (file_sha256(out), out.stat().st_mtime_ns) == before


def test_a_pivotal_lora_writes_and_registers_its_embedding(base: Path, tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "adforge.db")
    images = _photos(tmp_path / "acme")
    reg = _photos(tmp_path / "bottles", n=2)
    (reg / "shot0.txt").write_text("bottle on a table")
    out = tmp_path / "models" / "loras" / "zwx.safetensors"
    (reg / "shot1.txt").write_text("zwx bottle on a table")  # a regularisation picture has no product in it
    res = _train(images, out, base, db, "--pivotal", "2", "--reg-images", str(reg))
    assert res.exit_code == 2 and "shot1.txt: a regularisation caption must not say the trigger word" in res.output
    assert not out.exists()
    (reg / "shot1.txt").unlink()  # default caption: the class word
    res = _train(images, out, base, db, "--pivotal", "2", "--conv", "--sample-every", "4", "--sample-steps", "2",
                 "--reg-images", str(reg))
    assert res.exit_code == 0, res.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("3", "2")
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"bottles": {"n_repeats": 1, "img_count": 2}}
    emb = tmp_path / "models" / "embeddings" / "zwx-bottle.safetensors"  # "zwx" is one word: "-bottle" added
    assert f"embedding: {emb} (prompts say 'zwx-bottle'" in res.output
    assert emb.is_file() and "with its embedding zwx-bottle" in res.output and "prompts say 'zwx-bottle'" in res.output
    lora_row, emb_row = _row(db, file_sha256(out)), _row(db, file_sha256(emb))
    assert (lora_row.kind, emb_row.kind) == ("lora", "embedding")
    assert emb_row.license == lora_row.license == "creativeml-openrail-m" and emb_row.license_source == "inherited"
    record = json.loads(lora_row.training)
    assert record["pivotal"] == {"token": "zwx-bottle", "vectors": 2, "embedding": str(emb)}
    assert record["settings"]["conv"] is True and json.loads(emb_row.training) == record
    assert (record["images"], record["regularisation_images"], record["regularisation_folder"]) == (3, 2, str(reg))
    res = runner.invoke(app, ["models", "list", "--db", db], catch_exceptions=False)
    assert res.output.count("pivotal: prompts say 'zwx-bottle' with both files") == 2, res.output
    # The samples say the embedding's name, rendered with the vectors as trained so far.
    sample = out.parent / ".train-zwx" / "samples" / "step-000004-0.png"
    assert parse_infotext(read_png_metadata(sample)[0])[0] == "zwx-bottle bottle"
    # A re-run finds both done; a name that is a CLIP word is refused before anything is loaded.
    before = (file_sha256(out), file_sha256(emb))
    res = _train(images, out, base, db, "--pivotal", "2", "--conv", "--sample-every", "4", "--sample-steps", "2",
                 "--reg-images", str(reg))
    assert res.exit_code == 0 and "nothing to train" in res.output and (file_sha256(out), file_sha256(emb)) == before
    res = _train(images, tmp_path / "other.safetensors", base, db, "--pivotal", "2", "--token", "bottle")
    assert res.exit_code == 2 and "ordinary word" in res.output
    # Another training's embedding in the way is refused, not overwritten.
    res = _train(images, tmp_path / "models" / "loras" / "zwx2.safetensors", base, db, "--pivotal", "2",
                 "--token", "zwx-bottle")
    assert res.exit_code == 2 and "is not this training's embedding" in res.output and file_sha256(emb) == before[1]


def test_a_killed_run_resumes(base: Path, tmp_path: Path) -> None:
    from flows.training import TrainingJob, run_training

    images = _photos(tmp_path / "acme")
    out = tmp_path / "zwx.safetensors"
    db = sqlite_url(tmp_path / "adforge.db")

    class Killed(Exception):
        pass

    def kill_at_3(done: int, total: int, loss: float) -> None:
        if done == 3:
            raise Killed

    settings = {"steps": 4, "save_every": 2, "rank": 2, "resolution": 64, "seed": 1}
    job = TrainingJob(kind="lora", images=str(images), trigger="zwx", class_word="bottle", out=str(out), model=str(base),
                      settings=settings, device="cpu", db_url=db)
    with pytest.raises(Killed):
        run_training(job, on_step=kill_at_3)
    assert not out.exists()
    res = _train(images, out, base, db)
    assert res.exit_code == 0, res.output
    assert "resumed at step 2" in res.output and out.is_file()


def test_a_non_commercial_base_gives_a_non_commercial_lora(nc_model: Path, tmp_path: Path) -> None:
    images = _photos(tmp_path / "acme")
    db = sqlite_url(tmp_path / "adforge.db")
    out = tmp_path / "nc.safetensors"
    res = _train(images, out, nc_model, db, "--license", "apache-2.0")  # claims more than the base allows: refused
    assert res.exit_code == 2 and "cannot be licensed more freely" in res.output and not out.exists()
    res = _train(images, out, nc_model, db, "--steps", "2")
    assert res.exit_code == 0, res.output
    row = _row(db, file_sha256(out))
    assert (row.license, row.commercial_use) == ("cc-by-nc-sa-4.0", False)
    assert "commercial use not allowed" in res.output


# ------------------------------------------------------------------------------------------------ embedding

EMB_FAST = ["--steps", "4", "--save-every", "2", "--vectors", "2", "--resolution", "64", "--device", "cpu", "--seed", "1"]


def _train_embedding(images: Path, out: Path, model: Path, db: str, *extra: str):
    return runner.invoke(app, ["train", "embedding", "--images", str(images), "--trigger", "zwx", "--class-word", "bottle",
                               "--model", str(model), "--out", str(out), "--db", db, *EMB_FAST, *extra],
                         catch_exceptions=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_embedding_end_to_end(base: Path, tmp_path: Path, suffix: str) -> None:
    images = _photos(tmp_path / "acme")
    (images / "shot0.txt").write_text("zwx bottle, on a table")
    db = sqlite_url(tmp_path / "adforge.db")
    out = tmp_path / "embeddings" / f"acme-bottle{suffix}"
    res = _train_embedding(images, out, base, db, "--token", "acme-bottle", "--sample-every", "2", "--sample-steps", "2")
    assert res.exit_code == 0, res.output
    sha = file_sha256(out)
    assert f"sha256:  {sha}" in res.output and "registered embedding acme-bottle" in res.output
    row = _row(db, sha)
    assert (row.kind, row.family, row.license, row.commercial_use, row.license_source) == (
        "embedding", "sd1", "creativeml-openrail-m", True, "inherited")
    record = json.loads(row.training)
    assert record["trainer"] == "embedding" and record["token"] == "acme-bottle" and record["vectors"] == 2
    assert record["steps"] == 4 and record["images"] == 3 and record["base_model"]["sha256"] == file_sha256(base)

    samples = out.parent / ".train-acme-bottle" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "step-000002-0.png", "step-000002-1.png", "step-000004-0.png", "step-000004-1.png"]
    prompt, _, params = parse_infotext(read_png_metadata(samples / "step-000004-0.png")[0])
    assert prompt == "acme-bottle bottle" and params["Training step"] == "4"
    # The samples rendered the vectors of their step, passed to the pipeline as a file named after the token.
    assert (out.parent / ".train-acme-bottle" / "sample-embeddings" / "acme-bottle-step-000004.safetensors").is_file()

    res = runner.invoke(app, ["models", "inspect", str(out), "--db", db], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 vector(s)" in res.output and "trained:     embedding on 3 images" in res.output and "acme-bottle" in res.output

    before = (sha, out.stat().st_mtime_ns)
    res = _train_embedding(images, out, base, db, "--token", "acme-bottle", "--sample-every", "2", "--sample-steps", "2")
    assert res.exit_code == 0, res.output
    assert "nothing to train" in res.output and (file_sha256(out), out.stat().st_mtime_ns) == before


def test_embedding_names_are_checked_before_training(base: Path, tmp_path: Path) -> None:
    images = _photos(tmp_path / "acme")
    db_file = tmp_path / "adforge.db"
    cases = [("bottle", "bottle.pt", "ordinary word"), ("acme bottle", "acme bottle.pt", "letters, digits"),
             ("acme-bottle", "other.pt", "must be named acme-bottle.pt"), (None, "acme-bottle.bin", ".pt (A1111) or .safetensors")]
    for token, name, why in cases:
        out = tmp_path / "embeddings" / name
        res = _train_embedding(images, out, base, sqlite_url(db_file), *(["--token", token] if token else []))
        assert res.exit_code == 2 and why in " ".join(res.output.split()), res.output
        assert not out.parent.exists() and not db_file.exists()


def test_a_killed_embedding_run_resumes(base: Path, tmp_path: Path) -> None:
    from flows.training import TrainingJob, run_training

    images = _photos(tmp_path / "acme")
    out = tmp_path / "acme-bottle.safetensors"
    db = sqlite_url(tmp_path / "adforge.db")

    def kill_at_3(done: int, total: int, loss: float) -> None:
        if done == 3:
            raise KeyboardInterrupt

    settings = {"steps": 4, "save_every": 2, "vectors": 2, "resolution": 64, "seed": 1}
    job = TrainingJob(kind="embedding", images=str(images), trigger="zwx", class_word="bottle", out=str(out),
                      model=str(base), settings=settings, device="cpu", db_url=db)
    with pytest.raises(KeyboardInterrupt):
        run_training(job, on_step=kill_at_3)
    assert not out.exists()
    res = _train_embedding(images, out, base, db)
    assert res.exit_code == 0, res.output
    assert "resumed at step 2" in res.output and out.is_file()


# ------------------------------------------------------------------------------------------------ DreamBooth


def test_dreambooth_end_to_end(base: Path, tmp_path: Path) -> None:
    images = _photos(tmp_path / "acme")
    db = sqlite_url(tmp_path / "adforge.db")
    out = tmp_path / "models" / "acme-bottle-db.safetensors"
    args = ["train", "dreambooth", "--images", str(images), "--trigger", "zwx", "--class-word", "bottle",
            "--model", str(base), "--out", str(out), "--db", db, "--steps", "2", "--save-every", "1",
            "--class-images", "2", "--class-steps", "2", "--resolution", "64", "--device", "cpu", "--seed", "1",
            "--sample-every", "2", "--sample-steps", "2"]
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sha = file_sha256(out)
    assert "registered model acme-bottle-db" in res.output
    row = _row(db, sha)
    assert (row.kind, row.family, row.license, row.commercial_use, row.license_source) == (
        "checkpoint", "sd1", "creativeml-openrail-m", True, "inherited")
    record = json.loads(row.training)
    assert record["trainer"] == "dreambooth" and record["steps"] == 2 and record["settings"]["num_class_images"] == 2
    state = out.parent / ".train-acme-bottle-db"
    assert len(list((state / "class-images").glob("*.png"))) == 2
    assert len(list((state / "samples").glob("*.png"))) == 2

    # A campaign model like any other: it loads and renders.
    res = runner.invoke(app, ["generate", "zwx bottle", "--model", str(out), "--steps", "2", "--seed", "3",
                              "--width", "64", "--height", "64", "--out", str(tmp_path / "renders")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "renders").glob("*.png"))) == 1

    before = out.stat().st_mtime_ns
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0 and "nothing to train" in res.output and out.stat().st_mtime_ns == before
