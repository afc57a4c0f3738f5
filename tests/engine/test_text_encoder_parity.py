"""Parity of the loaded CLIP text encoder with an independent reference written here in plain torch.

The reference reads its weights by the checkpoint's own key names (``cond_stage_model.transformer.text_model.*``)
straight from the file, so a wrong prefix strip, a swapped q/k/v, a missing causal mask, the wrong activation or a
wrong clip-skip layer in engine/ shows up as a numerical difference. diffusers' offline converter gives an
independent check of the prefix convention.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint import CLIP_PREFIX, open_state_dict
from engine.loading import load_checkpoint
from engine.text_encoder import encode_tokens
from engine.tokenizer import BOS_ID, EOS_ID
from engine.random_checkpoint import TINY_TEXT, TINY_UNET, random_sd1_state_dict, sd1_metadata

TOL = 1e-5
# Three layers so that clip skip 1, 2 and 3 all pick different layers; four 8-wide heads, which is neither the
# 64-wide-head default nor one head, so the head count must come from the file's metadata.
TEXT = replace(TINY_TEXT, num_layers=3, num_heads=4)
REF_PREFIX = CLIP_PREFIX + "text_model."


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(3, text=TEXT)


def _write_checkpoint(path: Path, sd: dict[str, torch.Tensor], *, text_model_level: bool) -> Path:
    prefix = REF_PREFIX if text_model_level else CLIP_PREFIX
    if not text_model_level:  # the older layout: cond_stage_model.transformer.<name>
        sd = {(CLIP_PREFIX + k[len(REF_PREFIX):] if k.startswith(REF_PREFIX) else k): v for k, v in sd.items()}
    sd = dict(sd)
    # Real SD 1.x files carry a position_ids tensor, sometimes a damaged float one (merges): it must be ignored.
    sd[prefix + "embeddings.position_ids"] = torch.arange(TEXT.max_position_embeddings, dtype=torch.float32)[None] + 0.4
    save_file(sd, str(path), metadata=sd1_metadata(TINY_UNET, TEXT))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, state_dict) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("te") / "te.safetensors", state_dict, text_model_level=True)


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    return load_checkpoint(checkpoint).text_encoder


# ---- the reference ------------------------------------------------------------------------------------------


class ReferenceCLIPText:
    """CLIP's text transformer from its tensors: pre-LN blocks, causal MHA with biased q/k/v/out, quick_gelu MLP."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_heads: int, eps: float = 1e-5):
        self.w = tensors
        self.heads = num_heads
        self.eps = eps
        self.layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layers."))

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        hd = d // h

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, hd).permute(0, 2, 1, 3)

        q = split(self._linear(x, p + ".q_proj"))
        k = split(self._linear(x, p + ".k_proj"))
        v = split(self._linear(x, p + ".v_proj"))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(-1) @ v
        return self._linear(out.permute(0, 2, 1, 3).reshape(b, n, d), p + ".out_proj")

    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state after each transformer block (no final layer norm)."""
        n = ids.shape[1]
        x = self.w["embeddings.token_embedding.weight"][ids] + self.w["embeddings.position_embedding.weight"][:n]
        outs = []
        for i in range(self.layers):
            p = f"encoder.layers.{i}"
            x = x + self._attention(self._ln(x, p + ".layer_norm1"), p + ".self_attn")
            hdn = self._linear(self._ln(x, p + ".layer_norm2"), p + ".mlp.fc1")
            hdn = hdn * torch.sigmoid(1.702 * hdn)  # quick_gelu
            x = x + self._linear(hdn, p + ".mlp.fc2")
            outs.append(x)
        return outs

    def encode(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        return self._ln(self.layer_outputs(ids)[-clip_skip], "final_layer_norm")


def _reference_from_file(path: Path, prefix: str) -> ReferenceCLIPText:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    assert "encoder.layers.0.self_attn.q_proj.weight" in tensors  # read by the file's real key names
    return ReferenceCLIPText(tensors, TEXT.num_heads)


def _ids(batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49406, (batch, 77), generator=gen)
    ids[:, 0] = BOS_ID
    ids[-1, -1] = EOS_ID  # a full-length prompt
    if batch > 1:
        ids[0, 20:] = EOS_ID  # a short one padded with EOS
    return ids


# ---- tests -------------------------------------------------------------------------------------------------


def test_reference_is_sane(checkpoint: Path) -> None:
    """The reference must be causal (later tokens do not change earlier outputs) and its layers must differ."""
    ref = _reference_from_file(checkpoint, REF_PREFIX)
    ids = _ids(1)
    changed = ids.clone()
    changed[0, 40] = 123
    a, b = ref.encode(ids, 1), ref.encode(changed, 1)
    torch.testing.assert_close(a[:, :40], b[:, :40], rtol=0, atol=0)
    assert not torch.allclose(a[:, 40:], b[:, 40:])
    assert not torch.allclose(ref.encode(ids, 1), ref.encode(ids, 2), atol=1e-3)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_encode_tokens_matches_reference(checkpoint: Path, loaded, clip_skip: int) -> None:
    ref = _reference_from_file(checkpoint, REF_PREFIX)
    ids = _ids()
    want = ref.encode(ids, clip_skip)
    got = encode_tokens(loaded, ids, clip_skip)
    assert got.dtype == torch.float32 and got.shape == (2, 77, TEXT.hidden_size)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_clip_skip_two_is_penultimate_layer_plus_final_norm(checkpoint: Path, loaded) -> None:
    ref = _reference_from_file(checkpoint, REF_PREFIX)
    ids = _ids()
    penultimate = ref.layer_outputs(ids)[-2]
    w = ref.w
    by_hand = F.layer_norm(penultimate, (TEXT.hidden_size,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], 1e-5)
    torch.testing.assert_close(encode_tokens(loaded, ids, 2), by_hand, rtol=0, atol=TOL)
    # and it is not the unnormalised penultimate state, nor the last layer
    assert (encode_tokens(loaded, ids, 2) - penultimate).abs().max() > 1e-2
    assert (encode_tokens(loaded, ids, 2) - encode_tokens(loaded, ids, 1)).abs().max() > 1e-2


def test_older_layout_without_text_model_level_matches_reference(tmp_path: Path, state_dict) -> None:
    path = _write_checkpoint(tmp_path / "old.safetensors", state_dict, text_model_level=False)
    assert not any(k.startswith(REF_PREFIX) for k in open_state_dict(path))
    ref = _reference_from_file(path, CLIP_PREFIX)
    model = load_checkpoint(path).text_encoder
    ids = _ids()
    for clip_skip in (1, 2):
        torch.testing.assert_close(encode_tokens(model, ids, clip_skip), ref.encode(ids, clip_skip), rtol=0, atol=TOL)


def test_position_ids_reset_not_taken_from_file(loaded) -> None:
    assert torch.equal(loaded.embeddings.position_ids, torch.arange(TEXT.max_position_embeddings)[None])


def test_clip_skip_out_of_range(loaded) -> None:
    ids = _ids(1)
    with pytest.raises(ValueError, match="clip skip"):
        encode_tokens(loaded, ids, 0)
    with pytest.raises(ValueError, match="exceeds"):
        encode_tokens(loaded, ids, TEXT.num_layers + 1)


def test_prefix_convention_matches_diffusers_converter(checkpoint: Path, loaded) -> None:
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    with safe_open(str(checkpoint), framework="pt") as f:
        file_sd = {k: f.get_tensor(k) for k in f.keys()}
    converted = convert_ldm_clip_checkpoint(file_sd)
    ours = set(loaded.state_dict())
    assert ours and not any(k.startswith("text_model.") for k in ours)  # transformers 5 names: no text_model level
    assert set(converted) - {"text_model.embeddings.position_ids"} == {"text_model." + k for k in ours}
    # and the tensors under those names are the ones our model holds
    state = loaded.state_dict()
    for k in ours:
        assert torch.equal(converted["text_model." + k], state[k]), k
