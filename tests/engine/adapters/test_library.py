"""Finding LoRA and embedding files by the names prompts use, cheaply and unambiguously."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.adapters.library as library_module
from engine.adapters.library import AdapterLibrary
from engine.adapters.refs import AdapterError, LoraUse
from engine.checkpoint import file_sha256
from engine.tokenizer import load_clip_tokenizer
from tests.engine.adapters.test_embeddings import write_kohya


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content + path.name.encode())  # distinct content, distinct hash
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    loras, embs = tmp_path / "Lora", tmp_path / "embeddings"
    touch(loras / "detail tweaker v1.5.safetensors")
    touch(loras / "styles" / "Ink Wash.safetensors")  # subfolders are searched, as in A1111
    touch(loras / "old.ckpt")
    touch(loras / "readme.txt")
    touch(loras / ".hidden.safetensors")
    (embs / "neg").mkdir(parents=True)
    write_kohya(embs / "EasyNegative.safetensors", torch.zeros(2, 32))
    write_kohya(embs / "neg" / "bad-hands-5.safetensors", torch.zeros(1, 32))
    touch(embs / "unused.pt")
    return loras, embs


def test_resolve_finds_tagged_loras_and_named_embeddings_in_both_prompts(folders, monkeypatch) -> None:
    hashed: list[str] = []
    real = library_module.file_sha256
    monkeypatch.setattr(library_module, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    lib = AdapterLibrary([folders[0]], [folders[1]])
    got = lib.resolve(
        "ink, <lora:detail tweaker v1.5:0.6:0.4> <lora:ink wash>, easynegative",
        "<lora:detail tweaker v1.5:0.6:0.4> bad-hands-5, <lora:old:-1> EasyNegative",
        load_clip_tokenizer(),
    )
    assert [(u.file.name, u.te, u.unet) for u in got.loras] == [
        ("detail tweaker v1.5", 0.6, 0.4), ("Ink Wash", 1.0, 1.0), ("old", -1.0, -1.0)]
    assert [e.name for e in got.embeddings] == ["EasyNegative", "bad-hands-5"]
    for f in [u.file for u in got.loras] + list(got.embeddings):
        assert f.sha256 == file_sha256(f.path)
    # only the files the prompts use were hashed: not unused.pt, not readme.txt
    assert sorted(hashed) == sorted(["detail tweaker v1.5.safetensors", "Ink Wash.safetensors", "old.ckpt",
                                     "EasyNegative.safetensors", "bad-hands-5.safetensors"])
    assert isinstance(got.loras[0], LoraUse)


def test_nothing_used_means_nothing_hashed(folders, monkeypatch) -> None:
    monkeypatch.setattr(library_module, "file_sha256", lambda p: pytest.fail(f"hashed {p}"))
    got = AdapterLibrary([folders[0]], [folders[1]]).resolve("a cat", "", load_clip_tokenizer())
    assert got.loras == () and got.embeddings == ()


def test_exact_case_first_then_any_case(tmp_path: Path) -> None:
    touch(tmp_path / "Style.safetensors")
    touch(tmp_path / "style.pt")
    touch(tmp_path / "Other.bin")
    lib = AdapterLibrary([tmp_path], [])
    assert Path(lib.lora("Style").path).name == "Style.safetensors"
    assert Path(lib.lora("style").path).name == "style.pt"
    assert Path(lib.lora("other").path).name == "Other.bin"
    with pytest.raises(AdapterError, match=r"LoRA 'STYLE' matches 2 files"):
        lib.lora("STYLE")


def test_one_name_two_files_is_an_error_naming_both(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "dup.safetensors")
    touch(tmp_path / "b" / "dup.safetensors")
    with pytest.raises(AdapterError, match=r"LoRA 'dup' matches 2 files \(.*a/dup\.safetensors, .*b/dup\.safetensors\)"):
        AdapterLibrary([tmp_path], []).resolve("<lora:dup>", "", load_clip_tokenizer())


def test_missing_lora_lists_folders_and_close_matches(folders, tmp_path: Path) -> None:
    lib = AdapterLibrary([folders[0], tmp_path / "nope"], [folders[1]])
    with pytest.raises(AdapterError, match=r"no LoRA named 'detail tweaker v15' in .*Lora, .*nope \(folder does not exist\)"
                                           r"; did you mean 'detail tweaker v1\.5'\?"):
        lib.resolve("<lora:detail tweaker v15:1>", "", load_clip_tokenizer())
    with pytest.raises(AdapterError, match=r"no LoRA named 'zzz' in .*Lora, .*nope \(folder does not exist\)$"):
        lib.lora("zzz")
    with pytest.raises(AdapterError, match="no LoRA named 'x' in no folder"):
        AdapterLibrary([], []).lora("x")


def test_missing_embedding_folder_means_no_embeddings(tmp_path: Path) -> None:
    lib = AdapterLibrary([], [tmp_path / "absent"])
    assert lib.resolve("easynegative", "", load_clip_tokenizer()).embeddings == ()
    assert lib.list_files().embeddings == ()


def test_same_file_at_two_strengths_across_spellings_is_an_error(folders) -> None:
    lib = AdapterLibrary([folders[0]], [])
    with pytest.raises(AdapterError, match="different strengths"):
        lib.resolve("<lora:old:0.5>", "<lora:old:0.7>", load_clip_tokenizer())
    with pytest.raises(AdapterError, match=r"<lora:OLD:0.7> names the same LoRA file .*old\.ckpt"):
        lib.resolve("<lora:old:0.5>", "<lora:OLD:0.7>", load_clip_tokenizer())
    got = lib.resolve("<lora:old:0.5>", "<lora:OLD:0.5>", load_clip_tokenizer())
    assert len(got.loras) == 1


def test_list_files_is_sorted_and_unhashed(folders) -> None:
    listing = AdapterLibrary([folders[0]], [folders[1]]).list_files()
    assert [f.name for f in listing.loras] == ["detail tweaker v1.5", "Ink Wash", "old"]
    assert [f.name for f in listing.embeddings] == ["bad-hands-5", "EasyNegative", "unused"]
    assert all(f.sha256 is None for f in listing.loras + listing.embeddings)


def test_symlink_loops_do_not_hang(tmp_path: Path) -> None:
    touch(tmp_path / "sub" / "x.safetensors")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [f.name for f in AdapterLibrary([tmp_path], []).list_files().loras] == ["x"]


def test_embedding_by_name_and_its_duplicates(folders) -> None:
    lib = AdapterLibrary([], [folders[1]])
    assert Path(lib.embedding("easynegative").path).name == "EasyNegative.safetensors"
    with pytest.raises(AdapterError, match=r"no embedding named 'easynegativ' .*did you mean 'EasyNegative'\?"):
        lib.embedding("easynegativ")
    touch(folders[1] / "EasyNegative.pt")  # a converted copy left beside the original
    with pytest.raises(AdapterError, match=r"embedding 'EasyNegative' matches 2 files"):
        lib.resolve("a cat", "easynegative", load_clip_tokenizer())
