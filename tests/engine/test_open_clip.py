"""OpenCLIP text towers (SD 2.x ViT-H, SDXL bigG) converted to transformers CLIP text models.

Three independent checks of the conversion: a plain-torch OpenCLIP text tower written here from the file's own
tensors (torch's ``nn.MultiheadAttention`` reads the fused ``in_proj`` itself, exact GELU, ``x @ text_projection``
at ``ids.argmax``), diffusers' own single-file converter, and the exact round trip of the inverse conversion.
The random towers are built from shapes here, not from our inverse conversion.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.conditioning import PromptEncoder
from engine.open_clip import (
    SD2_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    open_clip_config,
    open_clip_source,
    open_clip_to_transformers,
    transformers_to_open_clip,
)
from engine.text_encoder import (
    SD2_ENCODING,
    TextEncoderConfig,
    build_text_encoder,
    encode_tokens,
    encode_with_pooled,
    reset_position_ids,
)
from engine.tokenizer import _MERGES_FILE, _VOCAB_FILE, BOS_ID, EOS_ID, _read_merges, load_clip_tokenizer

TOL = 1e-5
# Four 8-wide heads (not OpenCLIP's 64-wide default, so the count must be passed); a projection narrower than the
# width, so a transposed projection cannot pass.
WIDTH, LAYERS, HEADS, MLP, PROJ = 32, 3, 4, 128, 24


def random_open_clip(
    seed: int = 0, *, width: int = WIDTH, layers: int = LAYERS, mlp: int = MLP, proj: int = PROJ, vocab: int = 49408
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower in open_clip's layout (prefix-free), random weights with some spread."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, fan_in: int | None = None) -> torch.Tensor:
        return torch.randn(shape, generator=gen) / (fan_in or shape[-1]) ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    sd = {
        "token_embedding.weight": rnd(vocab, width, fan_in=1),
        "positional_embedding": 0.1 * rnd(77, width, fan_in=1),
        "ln_final.weight": norm(width),
        "ln_final.bias": 0.1 * rnd(width, fan_in=1),
        "text_projection": rnd(width, proj, fan_in=width),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd |= {
            b + "ln_1.weight": norm(width), b + "ln_1.bias": 0.1 * rnd(width, fan_in=1),
            b + "attn.in_proj_weight": rnd(3 * width, width), b + "attn.in_proj_bias": 0.1 * rnd(3 * width, fan_in=1),
            b + "attn.out_proj.weight": rnd(width, width), b + "attn.out_proj.bias": 0.1 * rnd(width, fan_in=1),
            b + "ln_2.weight": norm(width), b + "ln_2.bias": 0.1 * rnd(width, fan_in=1),
            b + "mlp.c_fc.weight": rnd(mlp, width), b + "mlp.c_fc.bias": 0.1 * rnd(mlp, fan_in=1),
            b + "mlp.c_proj.weight": rnd(width, mlp), b + "mlp.c_proj.bias": 0.1 * rnd(width, fan_in=1),
        }
    return sd


def load_open_clip(sd: dict[str, torch.Tensor], *, heads: int = HEADS, with_projection: bool) -> CLIPTextModel:
    """What a loader does: config from shapes, model on the meta device, the converted views assigned."""
    cfg = open_clip_config(sd, num_heads=heads, with_projection=with_projection)
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    model.load_state_dict(open_clip_to_transformers(sd, with_projection=with_projection), strict=True, assign=True)
    reset_position_ids(model, "cpu")
    return model.eval().requires_grad_(False)  # type: ignore[return-value]


def hf_tokenizer(pad: str) -> CLIPTokenizer:
    """CLIP's BPE as a transformers tokenizer padding with ``pad``: diffusers' SDXL ``tokenizer`` ("<|endoftext|>")
    and ``tokenizer_2`` / SD 2.x's tokenizer ("!", diffusers' convert_from_ckpt passes pad_token="!")."""
    with _VOCAB_FILE.open(encoding="utf-8") as fh:
        vocab = json.load(fh)
    eos = "<|endoftext|>"
    return CLIPTokenizer(vocab=vocab, merges=_read_merges(_MERGES_FILE), unk_token=eos, bos_token="<|startoftext|>",
                         eos_token=eos, pad_token=pad, model_max_length=77)


class ReferenceOpenCLIPText:
    """open_clip's text tower from its own tensors: pre-LN residual blocks of torch's MultiheadAttention (fused
    in_proj, causal mask) and a c_fc -> GELU -> c_proj MLP; ln_final; pooled = x[argmax(ids)] @ text_projection."""

    def __init__(self, sd: dict[str, torch.Tensor], heads: int = HEADS):
        self.w = sd
        self.layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
        width = sd["token_embedding.weight"].shape[1]
        self.attn = []
        for i in range(self.layers):
            mha = nn.MultiheadAttention(width, heads, batch_first=True)
            b = f"transformer.resblocks.{i}.attn."
            mha.load_state_dict({k: sd[b + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
            self.attn.append(mha.eval())

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], 1e-5)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.no_grad()
    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        n = ids.shape[1]
        x = self.w["token_embedding.weight"][ids] + self.w["positional_embedding"][:n]
        mask = torch.full((n, n), float("-inf")).triu(1)
        outs = []
        for i, mha in enumerate(self.attn):
            b = f"transformer.resblocks.{i}."
            h = self._ln(x, b + "ln_1")
            x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
            x = x + self._lin(F.gelu(self._lin(self._ln(x, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
            outs.append(x)
        return outs

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self._ln(x, "ln_final")

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.final(self.layer_outputs(ids)[-1])
        return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.w["text_projection"]


def _ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 49406, (2, 77), generator=gen)
    ids[:, 0] = BOS_ID
    ids[0, 9], ids[0, 10:] = EOS_ID, 0  # a short prompt, OpenCLIP-padded
    ids[1, -1] = EOS_ID  # a full one
    return ids


@pytest.fixture(scope="module")
def tower() -> dict[str, torch.Tensor]:
    return random_open_clip()


# ---- the plain-torch reference ---------------------------------------------------------------------------------


def test_every_layer_the_final_norm_and_the_pooled_output_match_open_clip(tower) -> None:
    ref = ReferenceOpenCLIPText(tower)
    model = load_open_clip(tower, with_projection=True)
    assert isinstance(model, CLIPTextModelWithProjection) and model.config.hidden_act == "gelu"
    ids = _ids()
    out = model(input_ids=ids, output_hidden_states=True)
    want = ref.layer_outputs(ids)
    for i, layer in enumerate(want):
        torch.testing.assert_close(out.hidden_states[i + 1], layer, rtol=0, atol=TOL)
    torch.testing.assert_close(out.last_hidden_state, ref.final(want[-1]), rtol=0, atol=TOL)
    torch.testing.assert_close(out.text_embeds, ref.pooled(ids), rtol=0, atol=TOL)
    # ours, explicitly at the first EOS: the same
    hidden, pooled = encode_with_pooled(model, ids)
    torch.testing.assert_close(pooled, ref.pooled(ids), rtol=0, atol=TOL)
    torch.testing.assert_close(hidden, want[-2], rtol=0, atol=TOL)  # SDXL: layer -2, no final norm


def test_sd2_reads_the_penultimate_layer_through_the_final_norm(tower) -> None:
    ref = ReferenceOpenCLIPText(tower)
    model = load_open_clip(tower, with_projection=False)
    assert type(model) is CLIPTextModel
    ids = _ids()
    layers = ref.layer_outputs(ids)
    kw = {"final_norm": SD2_ENCODING.final_norm, "min_skip": SD2_ENCODING.min_skip}
    torch.testing.assert_close(encode_tokens(model, ids, 1, **kw), ref.final(layers[-2]), rtol=0, atol=TOL)
    assert torch.equal(encode_tokens(model, ids, 2, **kw), encode_tokens(model, ids, 1, **kw))  # 2 is the floor
    torch.testing.assert_close(encode_tokens(model, ids, 3, **kw), ref.final(layers[-3]), rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="exceeds"):
        encode_tokens(model, ids, LAYERS + 1, **kw)


# ---- diffusers' converter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, with_projection", [
    (SD2_PREFIX, False), (SDXL_CLIP_G_PREFIX, True), (SDXL_REFINER_CLIP_G_PREFIX, True),
])
def test_conversion_equals_diffusers_single_file_conversion(tower, prefix: str, with_projection: bool) -> None:
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ours = load_open_clip(tower, with_projection=with_projection)
    checkpoint = {prefix + k: v for k, v in tower.items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts of the file are left alone
    theirs = convert_open_clip_checkpoint(ours, checkpoint, prefix=prefix)
    if not with_projection:  # create_diffusers_clip_model_from_ldm strips this level for transformers 5's CLIPTextModel
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    mine = ours.state_dict()
    assert set(theirs) == set(mine)
    for k in mine:
        assert torch.equal(theirs[k], mine[k]), k
    # and a model built from their dict computes the same hidden states
    other = build_text_encoder(open_clip_config(tower, num_heads=HEADS, with_projection=with_projection))
    other.load_state_dict(theirs, strict=True)
    ids = _ids()
    a = ours(input_ids=ids, output_hidden_states=True)
    b = other(input_ids=ids, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=TOL)
    if with_projection:
        torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=TOL)


# ---- the conversion itself ----------------------------------------------------------------------------------


def test_conversion_copies_nothing(tower) -> None:
    out = open_clip_to_transformers(tower, with_projection=True)
    fused = tower["transformer.resblocks.1.attn.in_proj_weight"]
    for name in ("q_proj", "k_proj", "v_proj"):
        part = out[f"text_model.encoder.layers.1.self_attn.{name}.weight"]
        assert part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() and part.is_contiguous()
    proj = out["text_projection.weight"]
    assert proj.shape == (PROJ, WIDTH) and proj.data_ptr() == tower["text_projection"].data_ptr()
    model = load_open_clip(tower, with_projection=True)  # assign=True keeps the views as the parameters
    assert model.text_model.encoder.layers[1].self_attn.v_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_source_of_every_converted_tensor_names_the_file_key(tower) -> None:
    for with_projection in (False, True):
        for name, tensor in open_clip_to_transformers(tower, with_projection=with_projection).items():
            source = open_clip_source(name)
            assert torch.equal(source.take(tower[source.key]), tensor), name
    with pytest.raises(ValueError, match="no OpenCLIP source"):
        open_clip_source("encoder.layers.0.mystery.weight")


def test_round_trips_are_exact(tower) -> None:
    for with_projection in (False, True):
        back = transformers_to_open_clip(open_clip_to_transformers(tower, with_projection=with_projection))
        dropped = {"logit_scale"} | (set() if with_projection else {"text_projection"})
        assert set(back) == set(tower) - dropped
        for k, v in back.items():
            assert torch.equal(v, tower[k]) and v.is_contiguous(), k
    # and from a transformers model: the writer's direction
    model = build_text_encoder(TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=2,
                                                 hidden_act="gelu", projection_dim=16))
    state = model.state_dict()
    again = open_clip_to_transformers(transformers_to_open_clip(state), with_projection=True)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_unknown_and_damaged_tensors() -> None:
    sd = random_open_clip(layers=1, vocab=64)
    out = open_clip_to_transformers(sd | {"transformer.resblocks.0.attn.mystery": torch.zeros(1)})
    assert "transformer.resblocks.0.attn.mystery" in out  # passed through for a strict loader to name
    assert "logit_scale" not in out and "text_projection" not in out
    bad = sd | {"transformer.resblocks.0.attn.in_proj_bias": torch.zeros(3 * WIDTH + 1)}
    with pytest.raises(ValueError, match="not three stacked"):
        open_clip_to_transformers(bad)
    state = open_clip_to_transformers(sd)
    with pytest.raises(ValueError, match="k_proj.weight is missing"):
        transformers_to_open_clip({k: v for k, v in state.items() if "k_proj.weight" not in k})
    with pytest.raises(ValueError, match="no OpenCLIP name"):
        transformers_to_open_clip(state | {"encoder.layers.0.mystery.weight": torch.zeros(1)})


def test_config_from_shapes() -> None:
    meta = {k: torch.empty(v.shape, device="meta") for k, v in random_open_clip(width=128, layers=2, mlp=512, proj=96, vocab=64).items()}
    cfg = open_clip_config(meta, with_projection=True)
    assert cfg == TextEncoderConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=2,
                                    max_position_embeddings=77, hidden_act="gelu", projection_dim=96)
    assert open_clip_config(meta).projection_dim is None
    assert open_clip_config(meta, num_heads=8).num_heads == 8
    with pytest.raises(ValueError, match="not divisible"):
        open_clip_config(meta, num_heads=3)
    with pytest.raises(KeyError, match="resblocks.0"):
        open_clip_config({k: v for k, v in meta.items() if not k.startswith("transformer.")})
    with pytest.raises(ValueError, match="text_projection has shape"):
        open_clip_config(meta | {"text_projection": torch.empty(96, 128, device="meta")}, with_projection=True)
    with pytest.raises(KeyError, match="text_projection"):
        open_clip_config({k: v for k, v in meta.items() if k != "text_projection"}, with_projection=True)


# ---- SD 2.x prompts: diffusers' StableDiffusionPipeline.encode_prompt --------------------------------------------


def test_sd2_prompt_encoding_equals_diffusers_pipeline(tower) -> None:
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ours = load_open_clip(tower, with_projection=False)
    # diffusers' SD 2.x text encoder is the tower without its last block (config num_hidden_layers 23 of 24, the
    # converter drops resblocks.23), read at its last layer through the final norm.
    cfg = open_clip_config(tower, num_heads=HEADS)
    theirs_model = build_text_encoder(TextEncoderConfig(**{**cfg.__dict__, "num_layers": LAYERS - 1}))
    converted = convert_open_clip_checkpoint(ours, {SD2_PREFIX + k: v for k, v in tower.items()}, prefix=SD2_PREFIX)
    last = f"encoder.layers.{LAYERS - 1}."
    theirs_model.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()
                                  if not k.removeprefix("text_model.").startswith(last)}, strict=True)
    tokenizer = hf_tokenizer("!")
    pipe = StableDiffusionPipeline(vae=None, text_encoder=theirs_model, tokenizer=tokenizer, unet=None, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    encoder = PromptEncoder(ours, load_clip_tokenizer(), torch.device("cpu"), torch.float32, SD2_ENCODING)
    for prompt in ("a photo of a cat", ""):
        want = pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]
        torch.testing.assert_close(encoder.encode(prompt), want, rtol=0, atol=TOL)
    ids = tokenizer("a photo", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [BOS_ID, 320, 1125, EOS_ID, 0] and set(ids[4:]) == {0}  # the padding it matches
