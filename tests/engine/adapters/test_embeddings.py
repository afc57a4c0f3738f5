"""Reading textual-inversion files: every layout users have, and every way a file can be wrong or hostile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.adapters.embeddings import MAX_FILE_BYTES, describe_embedding, read_embedding
from engine.adapters.refs import AdapterError, AdapterFile
from engine.checkpoint import file_sha256

WIDTH = 32  # the tiny text encoder's width (engine.random_checkpoint.TINY_TEXT)


# ---- writers shared with test_embeddings_conditioning.py --------------------------------------------------------


def write_a1111(path: Path, vectors: torch.Tensor, step: int = 500) -> Path:
    """A1111's own ``Embedding.save`` layout."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
                "name": "trained-as", "step": step, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "base"}, path)
    return path


def write_kohya(path: Path, vectors: torch.Tensor) -> Path:
    save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


def write_diffusers(path: Path, vectors: torch.Tensor, token: str = "<my-concept>") -> Path:
    torch.save({token: vectors.clone()}, path)
    return path


def adapter(path: Path, sha256: str | None = None) -> AdapterFile:
    return AdapterFile(name=path.stem, path=str(path), sha256=sha256)


# ---- layouts ----------------------------------------------------------------------------------------------------

VECS = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("writer", [write_a1111, write_kohya, write_diffusers])
def test_each_layout_reads_the_same_vectors(tmp_path: Path, writer) -> None:
    suffix = ".safetensors" if writer is write_kohya else ".pt"
    path = writer(tmp_path / f"concept{suffix}", VECS)
    emb = read_embedding(adapter(path), width=WIDTH)
    assert emb.name == "concept" and emb.n_vectors == 3
    assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, VECS)
    assert not emb.vectors.requires_grad


def test_diffusers_one_dimensional_vector_and_half_precision(tmp_path: Path) -> None:
    path = write_diffusers(tmp_path / "learned_embeds.bin", VECS[0].half())
    emb = read_embedding(adapter(path), width=WIDTH)
    assert emb.vectors.shape == (1, WIDTH) and emb.vectors.dtype == torch.float32
    assert torch.equal(emb.vectors[0], VECS[0].half().float())
    save_file({"<tok>": VECS[:2].contiguous()}, str(tmp_path / "d.safetensors"))
    assert read_embedding(adapter(tmp_path / "d.safetensors"), width=WIDTH).n_vectors == 2


def test_describe_reports_format_widths_and_training_facts(tmp_path: Path) -> None:
    info = describe_embedding(write_a1111(tmp_path / "a.pt", torch.zeros(4, 768)))
    assert (info.format, info.vectors, info.width, info.family) == ("a1111", 4, 768, "SD 1.x")
    assert (info.step, info.trained_name, info.checkpoint_name) == (500, "trained-as", "base")
    info = describe_embedding(write_kohya(tmp_path / "k.safetensors", torch.zeros(2, 1024)))
    assert (info.format, info.vectors, info.width, info.family, info.step) == ("kohya", 2, 1024, "SD 2.x", None)
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "x.safetensors"))
    info = describe_embedding(tmp_path / "x.safetensors")
    assert (info.format, info.width, info.parts, info.family) == ("sdxl", None, {"clip_l": 768, "clip_g": 1280}, "SDXL")
    info = describe_embedding(write_diffusers(tmp_path / "d.bin", torch.zeros(WIDTH)))
    assert (info.format, info.vectors, info.width, info.family) == ("diffusers", 1, WIDTH, None)


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_width_mismatch_names_the_file_and_both_widths(tmp_path: Path) -> None:
    path = write_a1111(tmp_path / "sd2thing.pt", torch.zeros(2, 1024))
    with pytest.raises(AdapterError, match=r"sd2thing\.pt: embedding vectors are 1024 wide \(SD 2\.x\); "
                                           r"this model's text encoder is 768 wide \(SD 1\.x\)"):
        read_embedding(adapter(path), width=768)


def test_sdxl_embedding_on_an_sd1_model_says_sdxl(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(path))
    with pytest.raises(AdapterError, match=r"xl\.safetensors: the embedding is for SDXL.*768 wide \(SD 1\.x\)"):
        read_embedding(adapter(path), width=768)


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "x": Evil()}, path)
    with pytest.raises(AdapterError, match=r"evil\.pt: cannot be read as an embedding: it holds more than weights") as info:
        read_embedding(adapter(path), width=WIDTH)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(AdapterError, match="pickles and are refused"):
        read_embedding(adapter(write_a1111(tmp_path / "ok.pt", VECS)), width=WIDTH, allow_pickle=False)


def test_sha256_is_checked_when_given(tmp_path: Path) -> None:
    path = write_kohya(tmp_path / "e.safetensors", VECS)
    assert read_embedding(adapter(path, file_sha256(path)), width=WIDTH).n_vectors == 3
    with pytest.raises(AdapterError, match=r"e\.safetensors: sha256 is [0-9a-f]{12}\.\.\., expected 000000000000"):
        read_embedding(adapter(path, "0" * 64), width=WIDTH)


def test_vector_count_is_bounded_before_reading_values(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="holds 76 vectors; an embedding has at most 75"):
        read_embedding(adapter(write_kohya(tmp_path / "76.safetensors", torch.zeros(76, WIDTH))), width=WIDTH)
    with pytest.raises(AdapterError, match="holds 76 vectors"):
        read_embedding(adapter(write_a1111(tmp_path / "76.pt", torch.zeros(76, WIDTH))), width=WIDTH)
    # A million one-wide half-precision vectors: small on disk, refused on its shape alone.
    save_file({"emb_params": torch.zeros(1_000_000, 1, dtype=torch.float16)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(AdapterError, match="holds 1000000 vectors"):
        read_embedding(adapter(tmp_path / "m.safetensors"), width=WIDTH)
    big = tmp_path / "big.pt"
    with big.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 2**20)  # sparse: costs no disk
    with pytest.raises(AdapterError, match=r"is 17 MB; a textual-inversion embedding is under 1 MB"):
        read_embedding(adapter(big), width=WIDTH)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "not a textual-inversion embedding"),
        ({"lora_te_x.lora_up.weight": torch.zeros(4, 4), "lora_te_x.lora_down.weight": torch.zeros(4, 4)}, "looks like a LoRA"),
        ({"string_to_param": {"*": torch.zeros(1, WIDTH), "+": torch.zeros(1, WIDTH)}}, "exactly one entry"),
        ({"string_to_param": {"*": "text"}}, "expected a tensor"),
        ({"emb_params": torch.zeros(2, 3, WIDTH)}, "1-D or 2-D"),
        ({"emb_params": torch.zeros(0, WIDTH)}, "no vectors"),
        ({"emb_params": torch.zeros(2, WIDTH, dtype=torch.int64)}, "floating point"),
        ({"emb_params": torch.full((2, WIDTH), float("nan"))}, "NaN"),
        ([torch.zeros(1, WIDTH)], "holds a list"),
    ],
)
def test_malformed_files_say_what_is_wrong(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(AdapterError, match=match) as info:
        read_embedding(adapter(path), width=WIDTH)
    assert str(path) in str(info.value)


def test_missing_truncated_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not found"):
        read_embedding(adapter(tmp_path / "nope.pt"), width=WIDTH)
    path = write_kohya(tmp_path / "cut.safetensors", VECS)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(AdapterError, match=r"cut\.safetensors: file is truncated"):
        read_embedding(adapter(path), width=WIDTH)
    (tmp_path / "e.png").write_bytes(b"\x89PNG")
    with pytest.raises(AdapterError, match="unknown embedding file type '.png'"):
        read_embedding(adapter(tmp_path / "e.png"), width=WIDTH)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(AdapterError, match=r"junk\.pt: cannot be read as an embedding"):
        read_embedding(adapter(tmp_path / "junk.pt"), width=WIDTH)
