"""diffusers folders (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``...) seen as single-file checkpoints.

:func:`open_model` opens either a single file (:func:`engine.checkpoint.open_state_dict`) or a folder; a folder becomes
a :class:`FolderStateDict` whose names are the single-file LDM layout :mod:`engine.loading` reads, so every family is
loaded by the same code. The U-Net and VAE tensors are the component files' memory-mapped tensors under new names (the
VAE's linear mid-block attention weights get a 1x1 view, as single files store them); nothing is read until asked for.

Text encoders: CLIP-L keeps transformers' names (``cond_stage_model.transformer.text_model.*``, SDXL
``conditioner.embedders.0.transformer.text_model.*``). The OpenCLIP towers (SD 2.x ViT-H, SDXL bigG) are given in
open_clip's layout (``cond_stage_model.model.*``, ``conditioner.embedders.1.model.*``): ``in_proj`` is q, k and v
concatenated and ``text_projection`` the transposed Linear weight, each built (a copy) when first read. diffusers'
SD 2.x text encoder lacks the tower's last block (SD 2.x reads the penultimate layer; diffusers drops the last and reads
the output), so a zero block stands in for it: the engine reads layer -2 of the tower, which is the folder's last.
diffusers keeps no ``text_projection`` / ``logit_scale`` for SD 2.x; our loader uses neither. The SDXL refiner, saved
with ``text_encoder`` null and bigG as ``text_encoder_2`` (``requires_aesthetics_score`` true), becomes the refiner
file's layout: bigG alone under ``conditioner.embedders.0.model.``.

Architecture facts no tensor shape carries come from the config files into the metadata our loader reads: U-Net head
size or count (``attention_head_dim`` / ``num_attention_heads`` per level), text encoder heads, native size
(``sample_size`` x the VAE's downscale) and the scheduler's ``prediction_type`` (``modelspec.prediction_type``).

The folder's identity (:func:`folder_sha256`): sha256 over the lines ``"<relative path> <sha256 of the file>\\n"`` of
every file read (``model_index.json``, each component's config, weights and tokenizer vocabulary, the scheduler
config), sorted by relative path. Weights may be one file, a shard index and its shards, a variant (``fp16``) or, with
``allow_pickle``, ``.bin`` pickles: :mod:`engine.diffusers_weights` chooses (full precision first) and every file it
reads is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict, file_sha256, open_state_dict
from engine.diffusers_weights import open_weights
from engine.diffusers_weights import read_json as _json
from engine.open_clip import SD2_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_REFINER_CLIP_G_PREFIX, open_clip_source

MODEL_INDEX = "model_index.json"
CLIP_VOCAB_SIZE = 49408
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # as engine.loading.SDXL_CLIP_L_PREFIX
SDXL_SIZE_EMBED_DIM = 256  # engine.unet.sdxl_size_embedding's width per size number
_SHIPPED_VOCAB = Path(__file__).resolve().parent / "tokenizer_data" / "vocab.json"
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}

# A tensor of the single-file view: (component weights file, its tensors) plus how to make the LDM tensor from them.
Source = tuple[Path, StateDict, Callable[[StateDict], torch.Tensor], tuple[int, ...]]


class FolderStateDict(StateDict):
    """A diffusers folder as a read-only mapping in the single-file layout: LDM names -> tensors, made on access."""

    def __init__(self, path: Path, sources: Mapping[str, Source], metadata: Mapping[str, str], files: list[Path]):
        super().__init__(path, {}, metadata=metadata)
        self._sources = dict(sources)
        self._keys = list(self._sources)
        self._key_set = set(self._keys)
        self.files = files  # every file read, for hashing

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        file, sd, make, _ = self._sources[key]
        return make(sd)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._key_set:
            raise KeyError(key)
        return self._sources[key][3]

    def sha256(self) -> str:
        """The folder's identity (:func:`folder_sha256`) from the files this view read."""
        lines = sorted(f"{f.relative_to(self.path).as_posix()} {file_sha256(f)}\n" for f in dict.fromkeys(self.files))
        return hashlib.sha256("".join(lines).encode()).hexdigest()


def open_model(path: str | os.PathLike[str], allow_pickle: bool = False, variant: str | None = None) -> StateDict:
    """The single-file view of a model: the file itself, or a diffusers folder mapped to the single-file layout
    (``variant``: which weights variant of a folder to read; see :mod:`engine.diffusers_weights`)."""
    p = Path(path)
    return open_folder(p, variant, allow_pickle) if p.is_dir() else open_state_dict(p, allow_pickle)


def folder_sha256(path: str | os.PathLike[str], variant: str | None = None, allow_pickle: bool = False) -> str:
    """The folder's identity: sha256 of ``"<relative path> <file sha256>\\n"`` lines, sorted, of every file read
    (shard indexes and every shard included, so a changed shard is another model)."""
    return open_folder(path, variant, allow_pickle).sha256()


def model_sha256(path: str | os.PathLike[str], allow_pickle: bool = False, variant: str | None = None) -> str:
    """``file_sha256`` of a file, :func:`folder_sha256` of a folder."""
    return folder_sha256(path, variant, allow_pickle) if Path(path).is_dir() else file_sha256(path)


class _Folder:
    def __init__(self, root: Path, variant: str | None = None, allow_pickle: bool = False):
        self.root = root
        self.variant, self.allow_pickle = variant, allow_pickle
        if not root.is_dir():
            raise CheckpointError(root, "not a folder")
        self.index_file = root / MODEL_INDEX
        if not self.index_file.is_file():
            raise CheckpointError(root, f"not a diffusers folder: no {MODEL_INDEX}")
        self.index = _json(self.index_file, MODEL_INDEX)
        self.files: list[Path] = [self.index_file]

    def listed(self, name: str) -> bool:
        entry = self.index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    def need(self, name: str) -> None:
        if not self.listed(name):
            raise CheckpointError(self.index_file, f"no {name!r} component listed", name)
        if not (self.root / name).is_dir():
            raise CheckpointError(self.root / name, f"missing component folder (listed in {MODEL_INDEX})")

    def config(self, name: str, file: str = "config.json") -> dict:
        self.need(name)
        path = self.root / name / file
        value = _json(path, f"{name} config")
        self.files.append(path)
        return value

    def weights(self, name: str) -> tuple[Path, StateDict]:
        """(the weights file or shard index, for messages; the tensors), with every file read kept for the hash."""
        found = open_weights(self.root / name, name, self.variant, self.allow_pickle)
        self.files.extend(found.files)
        return found.entry, found.tensors


def _direct(key: str, reshape: tuple[int, ...] | None = None) -> Callable[[StateDict], torch.Tensor]:
    if reshape is None:
        return lambda sd: sd[key]
    return lambda sd: sd[key].reshape(reshape)


# ---- U-Net -------------------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_BLOCK = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _unet_prefixes(cfg: dict, file: Path) -> Callable[[str], str | None]:
    """diffusers U-Net name -> LDM name (prefix-free), from the config's block structure; None if unknown."""
    down = list(cfg.get("down_block_types") or [])
    up = list(cfg.get("up_block_types") or [])
    per = cfg.get("layers_per_block", 2)
    if not isinstance(per, int) or len(down) != len(up) or not down:
        raise CheckpointError(file, f"unsupported U-Net block structure (layers_per_block {per!r}, {len(down)} down / "
                                    f"{len(up)} up blocks)")
    step = per + 1  # LDM input blocks per level: layers_per_block, then the downsampler; output blocks: per + 1

    def resnet(rest: str) -> str | None:
        part, _, last = rest.rpartition(".")
        return f"{_RESNET[part]}.{last}" if part in _RESNET else None

    def rename(name: str) -> str | None:
        stem, _, last = name.rpartition(".")
        if stem in _UNET_TOP:
            return f"{_UNET_TOP[stem]}.{last}"
        if m := _MID_BLOCK.fullmatch(name):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "attentions":
                return f"middle_block.1.{rest}" if j == 0 else None
            r = resnet(rest)
            return f"middle_block.{2 * j}.{r}" if r and j < 2 else None
        m = _UNET_BLOCK.fullmatch(name)
        if m is None:
            return None
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if b >= len(down):
            return None
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * step}.0.op.{rest.removeprefix('conv.')}" if j == 0 and rest.startswith("conv.") else None
            if j >= per:
                return None
            block = f"input_blocks.{1 + b * step + j}"
        else:
            if kind == "upsamplers":
                at = 2 if "CrossAttn" in up[b] else 1
                return f"output_blocks.{b * step + per}.{at}.{rest}" if j == 0 and rest.startswith("conv.") else None
            if j > per:
                return None
            block = f"output_blocks.{b * step + j}"
        if kind == "attentions":
            return f"{block}.1.{rest}"
        r = resnet(rest)
        return f"{block}.0.{r}" if r else None

    return rename


def _unet_metadata(cfg: dict, file: Path) -> dict[str, str]:
    """Head size (or count) and checks of what the engine's U-Net fixes (sinusoidal time embedding, SDXL sizes)."""
    for key, want in (("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                      ("class_embed_type", None), ("time_embedding_type", "positional")):
        if cfg.get(key, want) != want:
            raise CheckpointError(file, f"{key}={cfg[key]!r} is not supported (the engine's U-Net has {want!r})", key)
    addition = cfg.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise CheckpointError(file, f"addition_embed_type={addition!r} is not supported", "addition_embed_type")
    if addition == "text_time" and cfg.get("addition_time_embed_dim") != SDXL_SIZE_EMBED_DIM:
        raise CheckpointError(file, f"addition_time_embed_dim={cfg.get('addition_time_embed_dim')!r}; the engine "
                                    f"embeds sizes {SDXL_SIZE_EMBED_DIM} wide", "addition_time_embed_dim")
    widths = list(cfg.get("block_out_channels") or [])
    down = list(cfg.get("down_block_types") or [])
    # diffusers' legacy naming: attention_head_dim is the number of heads unless num_attention_heads is given.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    levels = [i for i, t in enumerate(down) if "CrossAttn" in t]
    if len(heads) != len(widths) or len(widths) != len(down):
        raise CheckpointError(file, f"{len(widths)} block widths, {len(down)} down blocks and {len(heads)} head counts")
    pairs = [(widths[i], heads[i]) for i in levels] + [(widths[-1], heads[-1])]
    sizes = {w // h for w, h in pairs if h and w % h == 0}
    if len(sizes) == 1 and all(h and w % h == 0 for w, h in pairs):
        return {"adforge.unet.head_channels": str(sizes.pop())}
    if len({h for _, h in pairs}) == 1:
        return {"adforge.unet.num_heads": str(pairs[0][1])}
    raise CheckpointError(file, f"attention heads {heads} for widths {widths}: neither one head size nor one head count "
                                "across levels, which the engine's U-Net cannot express", "attention_head_dim")


# ---- VAE ---------------------------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # the second row: older diffusers names
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


def _vae_rename(levels: int) -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        stem, _, last = name.rpartition(".")
        if last not in ("weight", "bias"):
            return None
        if stem in ("quant_conv", "post_quant_conv"):
            return name
        side, _, rest = stem.partition(".")
        if side not in ("encoder", "decoder"):
            return None
        if rest in _VAE_TOP:
            return f"{side}.{_VAE_TOP[rest]}.{last}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            part = _VAE_ATTN.get(m.group(1))
            return f"{side}.mid.attn_1.{part}.{last}" if part else None
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
            part = _VAE_RESNET.get(m.group(2))
            return f"{side}.mid.block_{int(m.group(1)) + 1}.{part}.{last}" if part else None
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        m = re.fullmatch(rf"{blocks}\.(\d+)\.(resnets\.(\d+)\.(.+)|(downsamplers|upsamplers)\.0\.conv)", rest)
        if m is None or int(m.group(1)) >= levels:
            return None
        i = int(m.group(1))
        level = f"down.{i}" if side == "encoder" else f"up.{levels - 1 - i}"
        if m.group(5):
            return f"{side}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{last}"
        part = _VAE_RESNET.get(m.group(4))
        return f"{side}.{level}.block.{m.group(3)}.{part}.{last}" if part else None

    return rename


_VAE_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


# ---- text encoders -----------------------------------------------------------------------------------------------

def _text_heads(configs: list[tuple[Path, dict]]) -> dict[str, str]:
    heads = {int(c.get("num_attention_heads", 0)) for _, c in configs}
    if len(heads) == 1:
        return {"adforge.text_encoder.num_heads": str(heads.pop())}
    if all(int(c["hidden_size"]) == 64 * int(c["num_attention_heads"]) for _, c in configs):
        return {}  # the loader's default: 64-wide heads
    raise CheckpointError(configs[0][0], "text encoders with different head counts that are not all 64 wide: the "
                                         "engine reads one head count for all of a model's text encoders")


def _check_act(path: Path, cfg: dict, want: str) -> None:
    if cfg.get("hidden_act", want) != want:
        raise CheckpointError(path, f"hidden_act={cfg.get('hidden_act')!r}; this tower uses {want!r}", "hidden_act")


def _clip_l(file: Path, sd: StateDict, prefix: str) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for key in sd:
        name = key if key.startswith("text_model.") else "text_model." + key
        if name.endswith("embeddings.position_ids"):
            continue  # a buffer, rebuilt at load
        if not name.startswith("text_model.") or name.startswith("text_model.text_projection"):
            raise CheckpointError(file, "unknown tensor name for a CLIP-L text encoder", key)
        out[prefix + name] = (file, sd, _direct(key), sd.shape(key))
    return out


def _open_clip(file: Path, sd: StateDict, prefix: str, *, stand_in_block: bool) -> dict[str, Source]:
    """A transformers-named tower in open_clip's layout; ``stand_in_block``: add a zero block after the last."""
    groups: dict[str, dict[int | None, str]] = {}
    transposed: set[str] = set()
    for key in sd:
        if key.endswith("position_ids"):
            continue
        try:
            src = open_clip_source(key)
        except ValueError:
            raise CheckpointError(file, "unknown tensor name for an OpenCLIP text encoder", key) from None
        groups.setdefault(src.key, {})[src.third] = key
        if src.transposed:
            transposed.add(src.key)
    out: dict[str, Source] = {}
    for name, parts in groups.items():
        if None in parts:
            key = parts[None]
            shape = sd.shape(key)
            if name in transposed:
                out[prefix + name] = (file, sd, lambda s, k=key: s[k].T.contiguous(), tuple(reversed(shape)))
            else:
                out[prefix + name] = (file, sd, _direct(key), shape)
            continue
        if sorted(parts) != [0, 1, 2]:
            missing = ("q_proj", "k_proj", "v_proj")[min({0, 1, 2} - set(parts))]
            raise CheckpointError(file, f"missing tensor: {missing} of {name}", next(iter(parts.values())))
        keys = [parts[i] for i in (0, 1, 2)]
        shape = sd.shape(keys[0])
        out[prefix + name] = (file, sd, lambda s, ks=keys: torch.cat([s[k] for k in ks], dim=0), (3 * shape[0], *shape[1:]))
    if stand_in_block:
        count = 1 + max((int(m.group(1)) for n in groups if (m := re.match(r"transformer\.resblocks\.(\d+)\.", n))), default=-1)
        if count == 0:
            raise CheckpointError(file, "no encoder layers in the text encoder", "text_model.encoder.layers.0")
        like, stand_in = f"transformer.resblocks.{count - 1}.", f"transformer.resblocks.{count}."
        dtype = sd[groups[like + "ln_1.weight"][None]].dtype
        for name in [n for n in out if n.startswith(prefix + like)]:
            shape = out[name][3]
            new = name.replace(like, stand_in)
            out[new] = (file, sd, lambda s, sh=shape: torch.zeros(sh, dtype=dtype), shape)
    return out


def _check_tokenizer(folder: _Folder, name: str) -> None:
    """The folder's tokenizer must be CLIP's (we tokenize with our own copy): ``vocab.json``, or, where only
    transformers' ``tokenizer.json`` is saved, its BPE vocabulary and added tokens."""
    folder.need(name)
    path = folder.root / name / "vocab.json"
    if path.is_file():
        vocab = _json(path, f"{name} vocabulary")
    else:
        path = folder.root / name / "tokenizer.json"
        whole = _json(path, f"{name} vocabulary (vocab.json or tokenizer.json)")
        model = whole.get("model")
        vocab = dict(model.get("vocab") or {}) if isinstance(model, dict) else {}
        for token in whole.get("added_tokens") or []:
            if isinstance(token, dict) and vocab.get(token.get("content")) != token.get("id"):
                vocab[str(token.get("content"))] = token.get("id")  # a token beyond CLIP's: the size check refuses
    folder.files.append(path)
    if len(vocab) != CLIP_VOCAB_SIZE or vocab != json.loads(_SHIPPED_VOCAB.read_text(encoding="utf-8")):
        raise CheckpointError(path, f"not CLIP's vocabulary ({len(vocab)} tokens; CLIP's has {CLIP_VOCAB_SIZE}): only "
                                    "models with CLIP's tokenizer can be loaded")


def _text_encoders(folder: _Folder, sources: dict[str, Source], unet_cfg: dict) -> list[tuple[Path, dict]]:
    """The folder's text encoders added to ``sources`` in the family's layout; their (config path, config), for the
    head count. Which family is told by what is listed: CLIP-L alone (SD 1.x), a gelu tower alone (SD 2.x), both
    (SDXL), or bigG alone as ``text_encoder_2`` (the SDXL refiner)."""
    if not folder.listed("text_encoder"):
        return _refiner_text_encoder(folder, sources, unet_cfg)
    text_cfg = folder.config("text_encoder")
    text_file, text_sd = folder.weights("text_encoder")
    _check_tokenizer(folder, "tokenizer")
    configs = [(folder.root / "text_encoder" / "config.json", text_cfg)]
    if folder.listed("text_encoder_2"):  # SDXL: CLIP-L and bigG (with its projection)
        cfg_2 = folder.config("text_encoder_2")
        configs.append((folder.root / "text_encoder_2" / "config.json", cfg_2))
        _check_act(configs[0][0], text_cfg, "quick_gelu")
        _check_act(configs[1][0], cfg_2, "gelu")
        _check_tokenizer(folder, "tokenizer_2")
        sources |= _clip_l(text_file, text_sd, SDXL_CLIP_L_PREFIX)
        file_2, sd_2 = folder.weights("text_encoder_2")
        sources |= _open_clip(file_2, sd_2, SDXL_CLIP_G_PREFIX, stand_in_block=False)
    elif text_cfg.get("hidden_act") == "gelu":  # SD 2.x: OpenCLIP ViT-H, stored by diffusers without its last block
        sources |= _open_clip(text_file, text_sd, SD2_PREFIX, stand_in_block=True)
    else:  # SD 1.x: CLIP-L
        _check_act(configs[0][0], text_cfg, "quick_gelu")
        sources |= _clip_l(text_file, text_sd, CLIP_PREFIX)
    return configs


def _refiner_text_encoder(folder: _Folder, sources: dict[str, Source], unet_cfg: dict) -> list[tuple[Path, dict]]:
    """The SDXL refiner as diffusers saves it (no ``text_encoder``, bigG as ``text_encoder_2``) in the refiner
    file's layout: bigG alone under ``conditioner.embedders.0.model.``, which is what detection calls a refiner."""
    if not folder.listed("text_encoder_2"):
        raise CheckpointError(folder.index_file, "no text encoder: 'text_encoder' is null and no 'text_encoder_2' is "
                                                 "listed (only the SDXL refiner comes without 'text_encoder', with bigG "
                                                 "as 'text_encoder_2')", "text_encoder")
    # Without the aesthetic score diffusers feeds a bigG-only U-Net six size numbers; the engine's refiner feeds five
    # and the score, so such a model would be conditioned wrongly.
    if folder.index.get("requires_aesthetics_score") is not True:
        raise CheckpointError(folder.index_file, "'text_encoder' is null but requires_aesthetics_score is not true: "
                                                 "not an SDXL refiner (the only bigG-only model the engine runs)",
                              "requires_aesthetics_score")
    path = folder.root / "text_encoder_2" / "config.json"
    cfg = folder.config("text_encoder_2")
    _check_act(path, cfg, "gelu")
    _check_tokenizer(folder, "tokenizer_2")
    # label_emb takes the pooled bigG output and 5 numbers (original size, crop, score), each embedded 256 wide.
    want = int(cfg.get("projection_dim") or 0) + 5 * SDXL_SIZE_EMBED_DIM
    got = unet_cfg.get("projection_class_embeddings_input_dim")
    if got != want:
        raise CheckpointError(folder.root / "unet" / "config.json", f"projection_class_embeddings_input_dim={got!r}; an "
                                                                   f"SDXL refiner's U-Net with this bigG takes {want}",
                              "projection_class_embeddings_input_dim")
    file, sd = folder.weights("text_encoder_2")
    sources |= _open_clip(file, sd, SDXL_REFINER_CLIP_G_PREFIX, stand_in_block=False)
    return [(path, cfg)]


# ---- the folder ----------------------------------------------------------------------------------------------------

def open_folder(path: str | os.PathLike[str], variant: str | None = None, allow_pickle: bool = False) -> FolderStateDict:
    """A diffusers folder in the single-file layout (see the module doc); CheckpointError naming file and key.
    ``variant`` (``fp16``...) and ``allow_pickle`` choose the weights files (:mod:`engine.diffusers_weights`)."""
    folder = _Folder(Path(path), variant, allow_pickle)
    sources: dict[str, Source] = {}
    meta: dict[str, str] = {}

    def add(component: str, prefix: str, rename: Callable[[str], str | None], what: str,
            reshape: Callable[[str, tuple[int, ...]], tuple[int, ...] | None] = lambda n, s: None) -> None:
        file, sd = folder.weights(component)
        for key in sd:
            name = rename(key)
            if name is None:
                raise CheckpointError(file, f"unknown tensor name for a diffusers {what}", key)
            shape = sd.shape(key)
            new_shape = reshape(name, shape)
            sources[prefix + name] = (file, sd, _direct(key, new_shape), new_shape or shape)

    unet_cfg = folder.config("unet")
    meta |= _unet_metadata(unet_cfg, folder.root / "unet" / "config.json")
    add("unet", UNET_PREFIX, _unet_prefixes(unet_cfg, folder.root / "unet" / "config.json"), "U-Net")

    vae_cfg = folder.config("vae")
    levels = len(vae_cfg.get("block_out_channels") or [])
    add("vae", VAE_PREFIX, _vae_rename(levels), "VAE",
        lambda n, s: (*s, 1, 1) if len(s) == 2 and _VAE_ATTN_WEIGHT.fullmatch(n) else None)
    sample = unet_cfg.get("sample_size")
    if isinstance(sample, int) and levels:
        meta["adforge.native_size"] = str(sample * 2 ** (levels - 1))

    configs = _text_encoders(folder, sources, unet_cfg)
    meta |= _text_heads(configs)

    sched = folder.config("scheduler", "scheduler_config.json")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise CheckpointError(folder.root / "scheduler" / "scheduler_config.json",
                              f"prediction_type {prediction!r}; the engine runs epsilon or v_prediction", "prediction_type")
    meta["modelspec.prediction_type"] = _PREDICTIONS[prediction]
    return FolderStateDict(folder.root, sources, meta, folder.files)
