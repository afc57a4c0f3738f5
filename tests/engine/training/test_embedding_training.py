"""Textual inversion on the tiny random models: only the vectors learn, a killed run resumes exactly, and the
exported files read back (our reader, diffusers' load_textual_inversion) to the very vectors the trainer used."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from engine.adapters.embeddings import describe_embedding, read_embedding
from engine.adapters.refs import AdapterFile
from engine.conditioning import PromptEncoder, chunk_prompt
from engine.loading import load_checkpoint
from engine.random_checkpoint import write_random
from engine.schedule import DiscreteSchedule
from engine.text_encoder import text_transformer
from engine.training.buckets import assign_buckets, make_buckets
from engine.training.caption_encoding import family_encoding
from engine.training.embedding_export import export_embedding
from engine.training.embedding_trainer import (
    EmbeddingTrainingConfig, as_embedding, check_token, encode_with_embeddings, initial_vectors, refuse_unsupported,
    token_captions, train_embedding,
)
from engine.training.lora_trainer import cache_latents
from tests.engine.training.helpers import Killed, kill_at, product_images

TOKEN = "zwx-bottle"
CONFIG = EmbeddingTrainingConfig(vectors=3, resolution=64, steps=6, batch_size=2, save_every=2, lr=5e-2, seed=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return product_images(tmp_path_factory.mktemp("product"), [(96, 72), (72, 96), (80, 80), (128, 64)],
                          "ZWX bottle, (on a table:1.2)", min_side=64)


@pytest.fixture(scope="module")
def trained(models, images, tmp_path_factory: pytest.TempPathFactory):
    return train_embedding(models, images, CONFIG, token=TOKEN, state_dir=tmp_path_factory.mktemp("state"))


def test_captions_say_the_name_and_vectors_start_as_the_class_word(models, images) -> None:
    assert token_captions(images, TOKEN) == [f"{TOKEN} bottle, (on a table:1.2)"] + [f"{TOKEN} bottle"] * 3
    table = text_transformer(models.text_encoder).embeddings.token_embedding.weight
    (bottle,) = models.tokenizer.encode("bottle")
    init = initial_vectors(models.text_encoder, models.tokenizer, "bottle", 3)
    assert torch.equal(init, table[[bottle] * 3].detach())
    two = models.tokenizer.encode("red bottle")
    assert torch.equal(initial_vectors(models.text_encoder, models.tokenizer, "red bottle", 3),
                       table[[two[0], two[1], two[0]]].detach())
    assert torch.equal(initial_vectors(models.text_encoder, models.tokenizer, "  ", 1),
                       table[models.tokenizer.encode("*")].detach())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_trainer_conditioning_equals_the_pipelines(family: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tiny_checkpoint if family == "sd1" else write_random(tmp_path / "sd2.safetensors", family="sd2")
    m = load_checkpoint(path)
    width = m.text_encoder.config.hidden_size
    vectors = torch.nn.Parameter(torch.randn(3, width, generator=torch.Generator().manual_seed(1)))
    emb = as_embedding(TOKEN, vectors)
    captions = [f"{TOKEN} bottle, (on a table:1.3)", "word " * 73 + f"{TOKEN} on a beach"]  # vectors spill to chunk 2
    ours = encode_with_embeddings(m.text_encoder, m.tokenizer, family_encoding(m), captions, {TOKEN: emb})
    ref = PromptEncoder(m.text_encoder, m.tokenizer, m.device, m.dtype, encoding=family_encoding(m)).encode_batch(
        captions, embeddings=[{TOKEN: as_embedding(TOKEN, vectors.detach())}] * 2)
    assert ours.shape == ref.shape == (2, 154, width)
    assert (ours - ref).abs().max() < 1e-5
    ours.square().sum().backward()  # gradients reach the vectors, and nothing else
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.text_encoder.parameters())


def test_training_lowers_the_loss_and_changes_nothing_but_the_vectors(models, images, tmp_path: Path) -> None:
    before = {name: {k: v.clone() for k, v in net.state_dict().items()}
              for name, net in (("unet", models.unet), ("te", models.text_encoder), ("vae", models.vae))}
    assignment = assign_buckets([(i.width, i.height) for i in images.items], make_buckets(64, 16))
    latents = cache_latents(models, images, assignment)
    ac = DiscreteSchedule.sd1().alphas_cumprod.float()
    g = torch.Generator().manual_seed(99)
    captions = token_captions(images, TOKEN)
    cases = [(latents[i], captions[i], t, torch.randn(latents[i].shape, generator=g))
             for i in latents for t in (100, 300, 500, 700, 900)]

    @torch.no_grad()
    def loss(vectors: torch.Tensor) -> float:
        total = 0.0
        for x0, caption, t, noise in cases:
            a = ac[t]
            context = encode_with_embeddings(models.text_encoder, models.tokenizer, family_encoding(models), [caption],
                                             {TOKEN: as_embedding(TOKEN, vectors)})
            pred = models.unet((a.sqrt() * x0 + (1 - a).sqrt() * noise)[None], torch.tensor([float(t)]), context)
            total += torch.nn.functional.mse_loss(pred[0], noise).item()
        return total / len(cases)

    config = EmbeddingTrainingConfig(vectors=2, resolution=64, steps=40, lr=0.1, seed=1)
    result = train_embedding(models, images, config, token=TOKEN, state_dir=tmp_path / "state")
    base = loss(initial_vectors(models.text_encoder, models.tokenizer, "bottle", 2))
    after = loss(result.vectors)
    print(f"fixed-noise loss {base:.4f} -> {after:.4f}")
    # The tiny random U-Net barely listens to its context (random vectors of any size move this loss by under
    # 0.5%), so the drop that shows learning is small; it is the same noise and timesteps before and after.
    assert after < 0.996 * base, (base, after)
    assert result.vectors.shape == (2, models.text_encoder.config.hidden_size)
    for name, net in (("unet", models.unet), ("te", models.text_encoder), ("vae", models.vae)):
        now = net.state_dict()
        assert now.keys() == before[name].keys()
        assert all(torch.equal(now[k], before[name][k]) for k in now), name


def test_killed_run_resumes_to_identical_vectors(models, images, trained, tmp_path: Path) -> None:
    steps_seen: list[int] = []
    samples: list[tuple[int, torch.Tensor]] = []
    with pytest.raises(Killed):
        train_embedding(models, images, CONFIG, token=TOKEN, state_dir=tmp_path, on_step=kill_at(5, steps_seen))
    sampling = EmbeddingTrainingConfig(**{**CONFIG.__dict__, "sample_every": 3})  # reporting is not identity
    resumed = train_embedding(models, images, sampling, token=TOKEN, state_dir=tmp_path,
                              on_step=lambda s, t, l: steps_seen.append(s),
                              on_sample=lambda s, e: samples.append((s, e.vectors)))
    assert steps_seen == [1, 2, 3, 4, 5, 5, 6]  # saved at 4: step 5 runs again
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.vectors, trained.vectors)
    assert resumed.losses == trained.losses
    assert [s for s, _ in samples] == [6] and torch.equal(samples[0][1], trained.vectors)
    init = initial_vectors(models.text_encoder, models.tokenizer, "bottle", 3)
    assert not torch.equal(trained.vectors, init)  # it trained

    for changed in ({"lr": 1e-2}, {"vectors": 2}, {"init_text": "can"}):
        with pytest.raises(ValueError, match="different embedding training"):
            train_embedding(models, images, EmbeddingTrainingConfig(**{**CONFIG.__dict__, **changed}), token=TOKEN,
                            state_dir=tmp_path)
    with pytest.raises(ValueError, match="different embedding training"):
        train_embedding(models, images, CONFIG, token="zwx-can", state_dir=tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_file_reads_back_to_the_trained_vectors(models, images, trained, tmp_path: Path, suffix: str) -> None:
    path = export_embedding(tmp_path / f"{TOKEN}{suffix}", trained, models, images, CONFIG, licence="CreativeML OpenRAIL-M")
    emb = read_embedding(AdapterFile(TOKEN, str(path)), width=models.text_encoder.config.hidden_size, allow_pickle=True)
    assert emb.name == TOKEN and emb.vectors.shape == (3, models.text_encoder.config.hidden_size)
    assert torch.equal(emb.vectors, trained.vectors)
    info = describe_embedding(path)
    assert info.vectors == 3 and info.name == TOKEN
    if suffix == ".pt":
        data = torch.load(path, weights_only=True)
        assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
        assert data["string_to_token"] == {"*": 265} and data["name"] == TOKEN and data["step"] == CONFIG.steps
        assert data["sd_checkpoint"] == models.checkpoint.sha256[:10]
        assert data["sd_checkpoint_name"] == models.checkpoint.path.stem
        assert (info.format, info.step, info.trained_name) == ("a1111", CONFIG.steps, TOKEN)
    else:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert list(f.keys()) == ["emb_params"]
        assert meta["adforge.image_set_sha256"] == images.sha256
        assert meta["adforge.base_model_sha256"] == models.checkpoint.sha256
        assert meta["adforge.licence"] == "CreativeML OpenRAIL-M"
        assert '"vectors": 3' in meta["adforge.training"] and info.format == "kohya"

    # A prompt naming the file puts exactly the trained vectors at the name's place, and encodes as the trainer did.
    prompt = f"a photo of {TOKEN}, (studio light:1.2)"
    (chunk,) = chunk_prompt(prompt, models.tokenizer, {TOKEN: emb})
    assert [o for o, _ in chunk.fixes] == [3] and chunk.fixes[0][1] is emb
    pipeline = PromptEncoder(models.text_encoder, models.tokenizer, models.device, models.dtype).encode(
        prompt, embeddings={TOKEN: emb})
    with torch.no_grad():
        trainer = encode_with_embeddings(models.text_encoder, models.tokenizer, family_encoding(models), [prompt],
                                         {TOKEN: trained.embedding()})[0]
    assert torch.equal(pipeline, trainer)


def test_file_named_otherwise_or_unknown_suffix_is_refused(models, images, trained, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be named zwx-bottle.pt"):
        export_embedding(tmp_path / "other.pt", trained, models, images, CONFIG)
    with pytest.raises(ValueError, match="unknown embedding format"):
        export_embedding(tmp_path / f"{TOKEN}.ckpt", trained, models, images, CONFIG)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_diffusers_load_textual_inversion_gives_our_encoding(models, images, trained, tmp_path: Path, suffix: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    path = export_embedding(tmp_path / f"{TOKEN}{suffix}", trained, models, images, CONFIG)
    text_encoder = copy.deepcopy(models.text_encoder)
    tokenizer = copy.deepcopy(models.tokenizer._hf)  # diffusers adds tokens to it: keep the engine's own untouched
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=None,
                                             scheduler=None, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    prompt = f"a photo of {TOKEN}"
    converted = pipe.maybe_convert_prompt(prompt, tokenizer)
    assert converted == f"a photo of {TOKEN} {TOKEN}_1 {TOKEN}_2"  # diffusers' own multi-vector tokens
    ids = tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0][0]
    emb = read_embedding(AdapterFile(TOKEN, str(path)), width=models.text_encoder.config.hidden_size)
    ours = PromptEncoder(models.text_encoder, models.tokenizer, models.device, models.dtype).encode(
        prompt, embeddings={TOKEN: emb})
    assert ours.shape == ref.shape
    assert (ours.float() - ref.float()).abs().max() < 1e-4


def test_bad_names_and_sdxl_are_refused(models, images, tmp_path: Path) -> None:
    tok = models.tokenizer
    for name, message in [("", "must not be empty"), ("  ", "must not be empty"), ("acme bottle", "no spaces"),
                          ("acme(bottle)", "prompt syntax"), ("-acme", "starting with"), ("x" * 65, "1-64"),
                          ("bottle", "ordinary word"), ("Cat", "ordinary word"), ("break", "BREAK")]:
        with pytest.raises(ValueError, match=message):
            check_token(name, tok)
    check_token("acme-bottle", tok)
    check_token("zwx_bottle2", tok)
    with pytest.raises(ValueError, match="ordinary word"):
        train_embedding(models, images, CONFIG, token="bottle", state_dir=tmp_path)
    fake = SimpleNamespace(text_encoder_2=object(), family=SimpleNamespace(name="sdxl", label="SDXL", inpainting=False))
    with pytest.raises(ValueError, match="SDXL embeddings need clip_l and clip_g"):
        refuse_unsupported(fake)
    with pytest.raises(ValueError, match="vectors must be 1 to 75"):
        train_embedding(models, images, EmbeddingTrainingConfig(vectors=0), token=TOKEN, state_dir=tmp_path)
