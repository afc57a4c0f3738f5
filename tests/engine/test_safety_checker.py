"""Our SD safety checker against diffusers' ``StableDiffusionSafetyChecker`` on a tiny random CLIP tower: the same
file (saved by diffusers' ``save_pretrained``), the same images, the same per-image flags and scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.safety_checker import SafetyCheckerError, load_safety_checker, preprocess

diffusers_sc = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")
from transformers import CLIPConfig, CLIPImageProcessor  # noqa: E402

SIZE, PROJ = 32, 16


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    out = []
    for i, (w, h) in enumerate([(32, 32), (48, 40), (40, 64), (64, 64), (37, 53), (80, 48)]):
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 2:  # smooth pictures too, not only noise
            base = np.asarray(Image.fromarray(base).resize((4, 4)).resize((w, h), Image.Resampling.BILINEAR))
        out.append(Image.fromarray(base))
    return out


def _reference(tmp: Path):
    torch.manual_seed(0)
    config = CLIPConfig(projection_dim=PROJ,
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "image_size": SIZE, "patch_size": 8},
                        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 4})
    ref = diffusers_sc.StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, p in ref.vision_model.named_parameters():
            if "norm" not in name:  # random norm biases would make every image's embedding alike
                p.normal_(0, 0.2)
        ref.visual_projection.weight.normal_(0, 0.3)
        ref.concept_embeds.normal_()
        ref.special_care_embeds.normal_()
    return ref


def _clip_inputs(images: list[Image.Image]) -> torch.Tensor:
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _diffusers_scores(ref, images: list[Image.Image], clip: torch.Tensor | None = None):
    """Flags and unrounded concept scores, as diffusers' ``forward_onnx`` computes them (its ``forward`` gives the
    same flags, from scores rounded to 3 decimals)."""
    clip = _clip_inputs(images) if clip is None else clip
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(clip)[1])
        cos = diffusers_sc.cosine_distance(embeds, ref.concept_embeds)
        special = diffusers_sc.cosine_distance(embeds, ref.special_care_embeds) - ref.special_care_embeds_weights
        concept = cos - ref.concept_embeds_weights + (special > 0).any(dim=1, keepdim=True) * 0.01
        _, flags = ref(clip_input=clip, images=[np.zeros((2, 2, 3)) for _ in images])
    return flags, concept, special, embeds


def test_preprocessing_matches_clip_image_processor():
    images = _images()
    diff = (preprocess(images, SIZE) - _clip_inputs(images)).abs()
    # transformers rounds a few resampled pixels the other way: at most one 8-bit level, in well under 1 % of them.
    assert diff.max() <= 1 / 255 / min(0.26130258, 0.26862954, 0.27577711) + 1e-5
    assert (diff > 1e-4).float().mean() < 0.01


def test_flags_and_scores_match_diffusers(tmp_path: Path):
    ref = _reference(tmp_path)
    images = _images()
    _, _, _, embeds = _diffusers_scores(ref, images)
    unit = torch.nn.functional.normalize(embeds, dim=-1)
    with torch.no_grad():
        # Concept 0 sits on image 0, concept 1 on image 2; thresholds chosen so only those two pass (the other
        # images' similarities to images 0 and 2 are at most 0.95 and 0.78); special-care concept 2 sits on image 2
        # with a threshold below its similarity, so image 2 takes the adjustment path.
        ref.concept_embeds[0] = embeds[0]
        ref.concept_embeds[1] = embeds[2] * 2.0
        ref.special_care_embeds[2] = embeds[2]
        cos = unit @ torch.nn.functional.normalize(ref.concept_embeds, dim=-1).T
        ref.concept_embeds_weights.copy_(cos.max(dim=0).values + 0.05)  # nobody over any threshold ...
        ref.concept_embeds_weights[0] = 0.97  # ... except image 0 (cos 1.0) for concept 0
        ref.concept_embeds_weights[1] = 1.005  # image 2 (cos 1.0) passes concept 1 only with the +0.01
        scos = unit @ torch.nn.functional.normalize(ref.special_care_embeds, dim=-1).T
        ref.special_care_embeds_weights.copy_(scos.max(dim=0).values + 0.05)
        ref.special_care_embeds_weights[2] = 0.85
    ref.save_pretrained(tmp_path / "safety_checker", safe_serialization=True)
    assert (tmp_path / "safety_checker" / "model.safetensors").is_file()

    ours = load_safety_checker(tmp_path / "safety_checker")
    verdicts = ours.check(images, batch_size=4)  # two batches
    flags, concept, special, _ = _diffusers_scores(ref, images)
    assert [v.flagged for v in verdicts] == list(flags)
    assert list(flags) == [True, False, True, False, False, False]
    # End to end the scores differ by the preprocessing's rounding only; on the same pixels they agree closely.
    assert torch.allclose(torch.tensor([v.concept_scores for v in verdicts]), concept.float(), atol=1e-3)
    assert torch.allclose(torch.tensor([v.special_scores for v in verdicts]), special.float(), atol=1e-3)
    pixels = preprocess(images, SIZE)
    ours_concept, ours_special = ours.scores(pixels)
    _, concept, special, _ = _diffusers_scores(ref, images, pixels)
    assert torch.allclose(ours_concept, concept.float(), atol=1e-5)
    assert torch.allclose(ours_special, special.float(), atol=1e-5)
    assert verdicts[0].concepts == [0] and verdicts[2].concepts == [1]
    assert verdicts[2].special_scores[2] > 0 and all(s <= 0 for s in verdicts[0].special_scores)
    assert abs(verdicts[2].concept_scores[1] - (1.0 - 1.005 + 0.01)) < 1e-4  # the adjustment made the difference
    # The weights file named directly (config.json beside it) loads the same checker.
    again = load_safety_checker(tmp_path / "safety_checker" / "model.safetensors").check(images[:1])
    assert np.allclose(again[0].concept_scores, verdicts[0].concept_scores, atol=1e-6)


def test_bad_files_name_the_file_and_key(tmp_path: Path):
    ref = _reference(tmp_path)
    folder = tmp_path / "sc"
    ref.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["visual_projection.weight"]
    save_file(state, weights)
    with pytest.raises(SafetyCheckerError, match=r"model\.safetensors: missing key 'visual_projection\.weight'"):
        load_safety_checker(folder)
    save_file({"x": torch.zeros(1)}, weights)
    with pytest.raises(SafetyCheckerError, match="missing key 'concept_embeds'"):
        load_safety_checker(folder)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(SafetyCheckerError, match=r"model\.safetensors: not a readable safetensors file"):
        load_safety_checker(folder)
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SafetyCheckerError, match=r"no model\.safetensors .*pytorch_model\.bin: only safetensors"):
        load_safety_checker(folder)
    (folder / "config.json").write_text(json.dumps({"projection_dim": 16}))
    save_file(state, weights)
    with pytest.raises(SafetyCheckerError, match=r"config\.json: missing key 'vision_config'"):
        load_safety_checker(folder)
    with pytest.raises(SafetyCheckerError, match="no such safety checker"):
        load_safety_checker(tmp_path / "nowhere")
