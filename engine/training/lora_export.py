"""A trained LoRA as a kohya-format safetensors file, with the ``ss_*`` metadata kohya's sd-scripts writes.

kohya's layout is what every loader reads (A1111, ComfyUI, diffusers' ``load_lora_weights``, our
:mod:`engine.adapters.lora_file`): ``<stem>.lora_down.weight`` [r, in(, kh, kw)], ``<stem>.lora_up.weight``
[out, r(, 1, 1)] and ``<stem>.alpha``, float16 by default (what sd-scripts saves with ``--save_precision fp16``).
SDXL files hold ``lora_unet_*`` in LDM names, ``lora_te1_*`` (CLIP-L) and ``lora_te2_*`` (bigG),
as sd-scripts' ``sdxl_train_network`` writes them. The ``ss_*`` keys let Civitai, A1111's metadata viewer and ``adforge models inspect`` show how it was trained;
``modelspec.*`` is Stability's model-spec header sd-scripts also writes; ``adforge.*`` records what the audit
trail needs (the image set's and the base model's sha256, the trigger, the licence the caller says applies).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.training.image_set import ImageSet
from engine.training.lora_trainer import LoraTrainingConfig, LoraTrainingResult

# sd-scripts' ss_base_model_version and the SAI model-spec architecture of each family/prediction we train. SDXL
# files say "sdxl_base_v1-0" (what sdxl_train_network writes; loaders and Civitai read "sdxl_*" as SDXL).
_BASE_VERSION = {("sd1", "eps"): "sd_v1", ("sd1", "v"): "sd_v1_v", ("sd2", "eps"): "sd_v2", ("sd2", "v"): "sd_v2_v",
                 ("sdxl", "eps"): "sdxl_base_v1-0"}
_ARCHITECTURE = {("sd1", "eps"): "stable-diffusion-v1", ("sd1", "v"): "stable-diffusion-v1",
                 ("sd2", "eps"): "stable-diffusion-v2-512", ("sd2", "v"): "stable-diffusion-v2-768-v",
                 ("sdxl", "eps"): "stable-diffusion-xl-v1-base"}


def _legacy_model_hash(path: Path) -> str:
    """sd-scripts' ``ss_sd_model_hash`` (A1111's old 8-hex hash): sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def lora_metadata(
    result: LoraTrainingResult, models, image_set: ImageSet, config: LoraTrainingConfig, *,
    output_name: str, licence: str | None = None,
) -> dict[str, str]:
    family = models.family.name.removesuffix("-inpaint")
    key = (family, models.prediction)
    r = result.resolution
    buckets = {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(sorted(result.buckets.items()))}
    batches_per_epoch = sum(-(-n // config.batch_size) for n in result.buckets.values())
    meta = {
        "ss_session_id": str(uuid.uuid4().int % 2**32),
        "ss_training_started_at": str(result.started_at),
        "ss_training_finished_at": str(result.finished_at),
        "ss_output_name": output_name,
        "ss_learning_rate": str(config.lr),
        "ss_unet_lr": str(config.lr),
        "ss_text_encoder_lr": str(config.text_lr if result.text_encoder else 0.0),
        "ss_num_train_images": str(len(image_set.items) - image_set.regularisation),
        "ss_num_reg_images": str(image_set.regularisation),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(-(-config.steps // batches_per_epoch)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_total_batch_size": str(config.batch_size),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(result.steps),
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={config.weight_decay})",
        "ss_max_grad_norm": "1.0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.network_alpha),
        "ss_network_args": json.dumps({"conv_dim": config.rank, "conv_alpha": config.network_alpha} if config.conv else {}),
        "ss_network_train_unet_only": str(not result.text_encoder),
        "ss_mixed_precision": config.mixed_precision if models.device.type == "cuda" else "no",
        "ss_full_fp16": "False",
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(models.prediction == "v"),
        "ss_base_model_version": _BASE_VERSION[key],
        "ss_clip_skip": str(config.clip_skip),
        "ss_cache_latents": "True",
        "ss_seed": str(config.seed),
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_prior_loss_weight": "1.0",
        "ss_resolution": f"({r}, {r})",
        "ss_enable_bucket": "True",
        "ss_bucket_no_upscale": "False",
        "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": result.extra.get("mean_ar_error", 0.0)}),
        "ss_dataset_dirs": json.dumps({image_set.folder.name: {
            "n_repeats": 1, "img_count": len(image_set.items) - image_set.regularisation}}),
        "ss_reg_dataset_dirs": json.dumps({image_set.regularisation_folder.name: {
            "n_repeats": 1, "img_count": image_set.regularisation}} if image_set.regularisation_folder else {}),
        "ss_tag_frequency": json.dumps(image_set.tag_frequency()),
        "ss_sd_model_name": models.checkpoint.path.name,
        "ss_new_sd_model_hash": models.checkpoint.sha256,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCHITECTURE[key]}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{r}x{r}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.finished_at)),
        "modelspec.prediction_type": "epsilon" if models.prediction == "eps" else "v",
        "adforge.image_set_sha256": image_set.sha256,
        "adforge.trigger": image_set.trigger,
        "adforge.class_word": image_set.class_word,
        "adforge.base_model_sha256": models.checkpoint.sha256,
        "adforge.training_fingerprint": result.fingerprint,
    }
    if result.token is not None:
        # Pivotal tuning: the LoRA was trained against this embedding in place of the trigger; it needs it loaded.
        meta["adforge.pivotal_embedding"] = result.token
        meta["adforge.pivotal_vectors"] = str(config.pivotal_vectors)
        meta["adforge.pivotal_lr"] = str(config.pivotal_lr)
    if licence:
        meta["adforge.licence"] = licence
        meta["modelspec.license"] = licence
    if models.checkpoint.path.is_file() and models.checkpoint.path.stat().st_size > 0x110000:
        meta["ss_sd_model_hash"] = _legacy_model_hash(models.checkpoint.path)
    if models.vae_file is not None:
        meta["ss_vae_name"] = models.vae_file.path.name
        meta["ss_new_vae_hash"] = models.vae_file.sha256
    return meta


def export_lora(
    path: str | os.PathLike[str], result: LoraTrainingResult, models, image_set: ImageSet,
    config: LoraTrainingConfig, *, licence: str | None = None, output_name: str | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the LoRA to ``path`` (written beside it, then renamed: a crash never leaves half a file)."""
    out = Path(path)
    tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in result.network.kohya_state_dict().items()}
    meta = lora_metadata(result, models, image_set, config, output_name=output_name or out.stem, licence=licence)
    tmp = out.with_name(out.name + ".part")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def export_pivotal_embedding(
    path: str | os.PathLike[str], result: LoraTrainingResult, models, image_set: ImageSet,
    config: LoraTrainingConfig, *, lora_name: str, licence: str | None = None,
) -> Path:
    """Write a pivotal-tuned LoRA's trigger embedding to ``path`` as kohya's ``{"emb_params": [n, width]}``
    safetensors (what A1111, ComfyUI, diffusers' ``load_textual_inversion`` and our loader read), with the embedding
    exporter's metadata plus the LoRA it belongs with. Prompts call an embedding by its file's name, so the file must
    be named after the token."""
    from engine.training.embedding_export import export_embedding
    from engine.training.embedding_trainer import EmbeddingTrainingResult

    out = Path(path)
    if result.token is None or result.vectors is None:
        raise ValueError("this LoRA was trained without pivotal tuning: it has no embedding to write")
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out.name}: a pivotal embedding is written as {result.token}.safetensors")
    as_embedding = EmbeddingTrainingResult(
        vectors=result.vectors, token=result.token, init_text=image_set.class_word, losses=result.losses,
        steps=result.steps, resumed_from=result.resumed_from, resolution=result.resolution, buckets=result.buckets,
        started_at=result.started_at, finished_at=result.finished_at, seconds=result.seconds,
        fingerprint=result.fingerprint)
    return export_embedding(out, as_embedding, models, image_set, config, licence=licence,
                            metadata={"adforge.kind": "pivotal-embedding", "adforge.lora": lora_name})
